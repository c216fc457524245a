"""Caffe's "fine-tuning CaffeNet for style recognition" recipe, done with caffe-ft.

Caffe's own recipe (models/finetune_flickr_style) copies CaffeNet's
train_val.prototxt, points its data layers at a Flickr style image list,
renames fc8 to fc8_flickr with 20 outputs and a 10x learning rate, lowers the
solver's base_lr and step size, and starts `caffe train` from the ImageNet
weights. Here `caffe-ft rewrite --strategy last-fc` makes those edits, and
freezes the other layers, on Debian caffe-doc's
models/bvlc_reference_caffenet/{train_val,solver}.prototxt:

1. rewrite the net and solver for a new N-class image list;
2. show what changed (`caffe-ft diff`) and the new net (`caffe-ft inspect`);
3. `caffe-ft check` which layers Caffe copies from the pretrained weights,
   and `caffe-ft init` the starting caffemodel (ImageNet trunk + fresh fc8).

Pretrained weights: pass your bvlc_reference_caffenet.caffemodel (the BVLC
model zoo's; 233 MiB) with --weights. Without it, step 3 runs against a
STAND-IN made by pycaffe from deploy.prototxt with Caffe's random fillers:
the same layers and shapes as the real model, so check and init behave the
same, but its numbers mean nothing and nothing should be trained from it.

Data: your own image lists (--train-data/--val-data, 'path label' lines, and
--num-classes); without them, a few synthetic "styles" (stripes, checks,
dots) are drawn as 256x256 PNGs.

Run inside the reference environment (it needs caffe-doc and pycaffe):

    scripts/caffe-env run -- python3 examples/caffenet/last_fc.py [--outdir DIR]

Each caffe-ft command is printed before it runs and its output shown.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from styles import STYLES, caffe_ft, write_images  # noqa: E402  (examples/styles.py)

CAFFENET = "/usr/share/doc/caffe-doc/models/bvlc_reference_caffenet"
# CaffeNet's ImageNet mean, per BGR channel (its train_val's commented-out alternative to the mean file).
MEAN = ("104", "117", "123")


def write_stand_in(deploy: str, path: str) -> None:
    """A caffemodel shaped like bvlc_reference_caffenet.caffemodel, filled by Caffe's random fillers."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe

    caffe.set_mode_cpu()
    caffe.Net(deploy, caffe.TEST).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="caffenet-last-fc", help="where everything goes (default: %(default)s)")
    parser.add_argument("--weights", help="bvlc_reference_caffenet.caffemodel (default: a random stand-in)")
    parser.add_argument("--train-data", help="training image list (default: synthetic styles)")
    parser.add_argument("--val-data", help="validation image list (default: synthetic styles)")
    parser.add_argument("--num-classes", type=int, help="classes of the image lists (default: 3, the styles)")
    args = parser.parse_args()
    if bool(args.train_data) != bool(args.val_data) or bool(args.train_data) != bool(args.num_classes):
        parser.error("--train-data, --val-data and --num-classes go together")
    outdir = args.outdir
    os.makedirs(outdir, exist_ok=True)

    # caffe-doc ships the big prototxts gzipped; the paths inside solver.prototxt are relative to Caffe's root.
    train_val = os.path.join(outdir, "train_val.prototxt")
    with gzip.open(os.path.join(CAFFENET, "train_val.prototxt.gz")) as packed, open(train_val, "wb") as plain:
        shutil.copyfileobj(packed, plain)
    shutil.copy(os.path.join(CAFFENET, "solver.prototxt"), outdir)
    if args.train_data:
        train, val, classes = args.train_data, args.val_data, args.num_classes
    else:
        train, val = write_images(os.path.join(outdir, "styles"), train_per_class=20, val_per_class=10)
        classes = len(STYLES)
        print(f"data: {len(STYLES)} synthetic styles ({', '.join(STYLES)}), 20 training and 10 validation images each")

    # 1. The recipe: only the new head (fc8 -> fc8_ft, N outputs, 10x lr) learns.
    finetune = os.path.join(outdir, "ft-last-fc")
    caffe_ft("rewrite", train_val, "--solver", os.path.join(outdir, "solver.prototxt"), "--strategy", "last-fc",
             "--num-classes", str(classes), "--train-data", train, "--val-data", val,
             "--resize", "256", *(word for value in MEAN for word in ("--mean-value", value)),
             "-o", finetune, "--force")

    # 2. What changed, and the new net.
    caffe_ft("diff", train_val, os.path.join(finetune, "train_val.prototxt"), ok=(1,))
    caffe_ft("diff", os.path.join(outdir, "solver.prototxt"), os.path.join(finetune, "solver.prototxt"), ok=(1,))
    caffe_ft("inspect", os.path.join(finetune, "train_val.prototxt"))

    # 3. The weights it starts from.
    weights = args.weights
    if not weights:
        weights = os.path.join(outdir, "STAND-IN-random-caffenet.caffemodel")
        print(f"\nno --weights: writing a STAND-IN for bvlc_reference_caffenet.caffemodel, random values "
              f"from Caffe's fillers ({os.path.basename(weights)}); pass the real model to fine-tune for real")
        write_stand_in(os.path.join(CAFFENET, "deploy.prototxt"), weights)
    caffe_ft("check", os.path.join(finetune, "train_val.prototxt"), "--weights", weights)
    caffe_ft("init", os.path.join(finetune, "train_val.prototxt"), "--weights", weights,
             "-o", os.path.join(finetune, "init.caffemodel"))
    print(f"\nnext, with the real weights: caffe-ft train {os.path.join(finetune, 'solver.prototxt')} "
          f"--weights {os.path.join(finetune, 'init.caffemodel')} --gpu 0 (or --cpu)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
