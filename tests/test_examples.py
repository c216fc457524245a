"""The runnable examples (examples/caffenet, examples/nsfw_resnet50), run for
real, and their READMEs' expected output kept true.

Each example runs in a fresh directory with its default --outdir, so its
output names the same relative paths as the README's transcript; the lines
checked here must appear both in the run's output and in the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import NSFW_DIR

pytestmark = pytest.mark.caffe
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name: str, script: str, cwd) -> str:
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, name, script)], cwd=str(cwd),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    assert done.returncode == 0, done.stdout[-5000:]
    return done.stdout


def readme(name: str) -> str:
    with open(os.path.join(EXAMPLES, name, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def assert_in_output_and_readme(lines, output: str, name: str) -> None:
    documented = readme(name)
    for line in lines:
        assert line in output, f"not in the output: {line!r}"
        assert line in documented, f"not in {name}/README.md: {line!r}"


def params(*shapes) -> int:
    """Parameters of blobs given as shape tuples."""
    total = 0
    for shape in shapes:
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


# CaffeNet's learnable layers: (weight shape, bias shape).
CAFFENET = {"conv1": ((96, 3, 11, 11), (96,)), "conv2": ((256, 48, 5, 5), (256,)),
            "conv3": ((384, 256, 3, 3), (384,)), "conv4": ((384, 192, 3, 3), (384,)),
            "conv5": ((256, 192, 3, 3), (256,)), "fc6": ((4096, 9216), (4096,)),
            "fc7": ((4096, 4096), (4096,))}


def test_caffenet_last_fc(tmp_path):
    output = run_example("caffenet", "last_fc.py", tmp_path)
    trunk = sum(params(*shapes) for shapes in CAFFENET.values())
    head = params((3, 4096), (3,))
    assert_in_output_and_readme([
        "data: 3 synthetic styles (stripes, checks, dots), 20 training and 10 validation images each",
        "- head 'fc8': num_output 1000 -> 3, renamed 'fc8_ft' (Caffe copies pretrained weights by layer name,"
        " so it starts afresh), lr_mult 10 (bias 20)",
        "- base_lr: 0.01 -> 0.001 (x0.1: the pretrained weights need small steps)",
        "- max_iter: 450000 -> 20 (10 epochs (last-fc on a small data set) of 60 examples in batches of 32: "
        "2 iterations each)",
        "- stepsize: 100000 -> 4 (0.222 of the run, as before)",
        "- test_interval: 1000 -> 2 (1 epoch(s); the last test at max_iter scores the final weights)",
        "~ fc8 -> fc8_ft (renamed)",
        "    inner_product_param.num_output: 1000 -> 3",
        "    image_data_param.source: (unset) -> \"../styles/train.txt\"",
        "    image_data_param.root_folder: (unset) -> \"../../\"",
        "net: \"models/bvlc_reference_caffenet/train_val.prototxt\" -> \"train_val.prototxt\"",
        "base_lr: 0.01 -> 0.001",
        "classifier head(s): fc8_ft",
        f"7 copied ({trunk:,} params), 1 fresh ({head:,} params), 0 mismatch (0 params)",
        "OK: Caffe would load these weights and start training",
        "wrote caffenet-last-fc/ft-last-fc/init.caffemodel: 7 layers copied, 1 filled fresh (seed 0)",
    ], output, "caffenet")
    assert re.search(r"^fc8_ft +InnerProduct +FRESH +3x4096, 3 ", output, re.M)
    for layer in CAFFENET:
        assert re.search(rf"^{layer} +\S+ +COPIED ", output, re.M), layer

    # The caffemodel written by init: the stand-in's trunk, a fresh 3-way head.
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    import numpy as np

    folder = tmp_path / "caffenet-last-fc"
    caffe.set_mode_cpu()
    stand_in = caffe.Net("/usr/share/doc/caffe-doc/models/bvlc_reference_caffenet/deploy.prototxt",
                         str(folder / "STAND-IN-random-caffenet.caffemodel"), caffe.TEST)
    start = caffe.Net(str(folder / "ft-last-fc" / "deploy.prototxt"),
                      str(folder / "ft-last-fc" / "init.caffemodel"), caffe.TEST)
    for layer in CAFFENET:
        for blob, original in zip(start.params[layer], stand_in.params[layer]):
            assert np.array_equal(blob.data, original.data), layer
    assert start.params["fc8_ft"][0].data.shape == (3, 4096)
    assert np.all(start.params["fc8_ft"][1].data == 0)  # constant bias filler
    assert 0.005 < start.params["fc8_ft"][0].data.std() < 0.02  # gaussian std 0.01


def test_nsfw_resnet50_finetune(tmp_path):
    output = run_example("nsfw_resnet50", "finetune.py", tmp_path)
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe

    pretrained = caffe.Net(os.path.join(NSFW_DIR, "deploy.prototxt"),
                           os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel"), caffe.TEST)
    trunk = sum(blob.data.size for layer, blobs in pretrained.params.items() if layer != "fc_nsfw"
                for blob in blobs)
    head = params((3, 1024), (3,))
    assert_in_output_and_readme([
        "data: 3 synthetic classes (stripes, checks, dots), 20 training and 10 validation images each",
        "training examples: 60 (3 classes: 20 20 20)",
        "penultimate  pool                   1.00    1024  0.967  0.983    0.234",
        "middle       eltwise_stage2_block0  0.52    1024  0.983  0.933    0.194",
        "rule: 2 (features suffice): the penultimate probe 0.967 reaches 0.9 and no earlier cut beats it by more"
        " than 0.066",
        "  caffe-ft finetune NET --weights MODEL --strategy features ...",
        f"159 copied ({trunk:,} params), 1 fresh ({head:,} params), 0 mismatch (0 params)",
        "OK: Caffe would load these weights and start training",
        "  fc_nsfw (InnerProduct: 2x1024, 2)",
    ], output, "nsfw_resnet50")
    assert re.search(r"^fc_nsfw_ft +InnerProduct +FRESH +3x1024, 3 ", output, re.M)
    found = re.search(r"^validation accuracy after 60 iterations \(batch 4\): (\d\.\d{3}) \(chance: 0\.333\)$",
                      output, re.M)
    assert found, output[-3000:]
    assert found.group(0).split(":")[0] in readme("nsfw_resnet50")
    assert float(found.group(1)) > 0.6  # it learned: chance is 1/3
    folder = tmp_path / "nsfw-finetune" / "ft-last-fc"
    for name in ("train_val.prototxt", "deploy.prototxt", "solver.prototxt", "init.caffemodel",
                 "final.caffemodel", "metrics.jsonl", "summary.md"):
        assert (folder / name).exists(), name
