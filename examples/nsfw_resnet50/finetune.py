"""Fine-tune a real pretrained ResNet-50 (Yahoo's open_nsfw) on a new task, on the CPU.

open_nsfw is a ResNet-50 "1by2" (half the channels) trained to tell safe from
not-safe-for-work images; only its deploy.prototxt and caffemodel are
published. caffe-ft turns that deploy net into a fine-tuning setup:

1. `caffe-ft advise`: the data set's size, and how well the frozen features
   separate the classes at three depths (linear probe, kNN, LogME), and the
   strategy that suggests;
2. `caffe-ft finetune --strategy last-fc`: a train_val with ImageData layers
   (open_nsfw's preprocessing: resize to 256, crop 224, BGR mean 104/117/123),
   a solver, the starting caffemodel (trunk copied, new 3-way head filled
   fresh), then a short training run in pycaffe;
3. the validation accuracy it reached.

Data: your image lists (--train-data/--val-data, 'path label' lines, and
--num-classes), or by default three synthetic classes of pictures (stripes,
checks, dots) drawn as 256x256 PNGs. The training run is tiny (--iters,
batch 4) so the example takes a minute or two on two cores; a real one trains
longer, e.g. with --gpu 0.

Run inside the reference environment (pycaffe, the nsfw model at /opt/models/nsfw):

    scripts/caffe-env run -- python3 examples/nsfw_resnet50/finetune.py [--outdir DIR]

Each caffe-ft command is printed before it runs and its output shown.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from styles import STYLES, caffe_ft, write_images  # noqa: E402  (examples/styles.py)

from caffe_ft.recipe.job import last_test_outputs  # noqa: E402

MODEL_DIR = os.environ.get("CAFFE_ENV_MODELS", "/opt/models/nsfw")
# open_nsfw's preprocessing (its classify_nsfw.py): 256x256, centre 224x224 crop, BGR mean.
PREPROCESS = ("--resize", "256", "--crop-size", "224",
              "--mean-value", "104", "--mean-value", "117", "--mean-value", "123")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="nsfw-finetune", help="where everything goes (default: %(default)s)")
    parser.add_argument("--train-data", help="training image list (default: synthetic classes)")
    parser.add_argument("--val-data", help="validation image list (default: synthetic classes)")
    parser.add_argument("--num-classes", type=int, help="classes of the image lists (default: 3)")
    parser.add_argument("--iters", type=int, default=60, help="training iterations (default: %(default)s)")
    args = parser.parse_args()
    if bool(args.train_data) != bool(args.val_data) or bool(args.train_data) != bool(args.num_classes):
        parser.error("--train-data, --val-data and --num-classes go together")
    net = os.path.join(MODEL_DIR, "deploy.prototxt")
    weights = os.path.join(MODEL_DIR, "resnet_50_1by2_nsfw.caffemodel")
    os.makedirs(args.outdir, exist_ok=True)
    if args.train_data:
        train, val, classes = args.train_data, args.val_data, args.num_classes
    else:
        train, val = write_images(os.path.join(args.outdir, "images"), train_per_class=20, val_per_class=10)
        classes = len(STYLES)
        print(f"data: {classes} synthetic classes ({', '.join(STYLES)}), 20 training and 10 validation images each")

    # 1. What the data suggests.
    caffe_ft("advise", net, "--weights", weights, "--train-data", train, "--sample", "60", *PREPROCESS)

    # 2. Rewrite, check, init and train: only the new head learns.
    target = os.path.join(args.outdir, "ft-last-fc")
    caffe_ft("finetune", net, "--weights", weights, "--strategy", "last-fc", "--num-classes", str(classes),
             "--train-data", train, "--val-data", val, *PREPROCESS, "--batch-size", "4", "--val-batch-size", "10",
             "--max-iter", str(args.iters), "--cpu", "-o", target, "--force")

    # 3. The result.
    print(f"\nvalidation accuracy after {args.iters} iterations (batch 4): "
          f"{last_test_outputs(os.path.join(target, 'metrics.jsonl'))['accuracy']:.3f} (chance: {1 / classes:.3f})")
    print(f"files: {target} (train_val/deploy/solver.prototxt, init.caffemodel, final.caffemodel, "
          "metrics.jsonl, plot.png, summary.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
