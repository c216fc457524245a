"""Torch engine vs pycaffe: training iterations per second on the CPU.

CaffeNet and the nsfw ResNet-50 (deploy nets with their Softmax replaced by
SoftmaxWithLoss on an Input label), batch 16, SGD with momentum, the same
random data every iteration; torch also with ``--channels-last``.  pycaffe runs in the reference environment
(this script re-runs itself there with ``--pycaffe``), torch on the host, in
the same run; the ratio is torch's rate over pycaffe's.

    CAFFE_FT_ROOT=... .venv/bin/python benchmarks/bench_torch_engine.py [--iterations N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BATCH = 16
NETS = {
    "caffenet": "/usr/share/doc/caffe-doc/models/bvlc_reference_caffenet/deploy.prototxt",
    "nsfw_resnet50": "/opt/models/nsfw/deploy.prototxt",
}
SOLVER = 'net: "{net}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n' \
         'max_iter: 100000\nsolver_mode: CPU\nsnapshot_after_train: false\n'


def train_net(deploy_text: str) -> str:
    """The deploy net with batch 16, a label Input and SoftmaxWithLoss instead of its Softmax."""
    import re

    text = re.sub(r"dim:\s*\d+", lambda m, seen=[]: "dim: %d" % BATCH if not seen.append(1) and len(seen) == 1
                  else m.group(0), deploy_text, count=1)
    blocks = text.split("layer {")
    last = blocks[-1]
    bottom = re.search(r'bottom:\s*"([^"]+)"', last).group(1)
    blocks[-1] = (' name: "loss" type: "SoftmaxWithLoss" bottom: "%s" bottom: "label" top: "loss" }\n' % bottom)
    head = blocks[0]
    label = 'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: %d } } }\n' % BATCH
    return head + label + "layer {".join([""] + blocks[1:])


def measure_pycaffe(name: str, iterations: int) -> float:
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    import numpy as np

    caffe.set_mode_cpu()
    work = tempfile.mkdtemp()
    net_path = os.path.join(work, "net.prototxt")
    with open(NETS[name]) as handle:
        text = train_net(handle.read())
    with open(net_path, "w") as handle:
        handle.write(text)
    with open(os.path.join(work, "solver.prototxt"), "w") as handle:
        handle.write(SOLVER.format(net=net_path))
    solver = caffe.get_solver(os.path.join(work, "solver.prototxt"))
    rng = np.random.default_rng(0)
    data_name = [name for name in solver.net.inputs if name != "label"][0]
    solver.net.blobs[data_name].data[...] = rng.normal(0, 1, solver.net.blobs[data_name].data.shape)
    solver.net.blobs["label"].data[...] = rng.integers(0, 2, BATCH)
    solver.step(1)
    began = time.perf_counter()
    solver.step(iterations)
    return iterations / (time.perf_counter() - began)


def measure_torch(name: str, iterations: int, channels_last: bool = False) -> float:
    import numpy as np
    import torch

    from caffe_ft.formats import prototext
    from caffe_ft.formats.schema import load_schema
    from caffe_ft.training.nets import NetSpec
    from caffe_ft.training.torch.engine import Trainer

    schema = load_schema()
    root = os.environ.get("CAFFE_FT_ROOT", "/var/cache/caffe-ft/bullseye").rstrip("/")
    with open(root + NETS[name]) as handle:
        text = train_net(handle.read())
    net = prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter"))
    solver = prototext.to_message(prototext.parse(SOLVER.format(net="net.prototxt").encode()),
                                  schema.new("SolverParameter"))
    rng = np.random.default_rng(0)
    data_name = next(layer.top[0] for layer in net.layer if layer.type == "Input" and layer.top[0] != "label")
    arrays = {}

    def feed(index: int):  # type: ignore[no-untyped-def]
        return arrays

    trainer = Trainer(solver, schema, NetSpec(net, "TRAIN", (), 0, "net"), [], feeds=[feed],
                      channels_last=channels_last)
    arrays[data_name] = rng.normal(0, 1, trainer.net.shapes.blobs[data_name]).astype(np.float32)
    arrays["label"] = rng.integers(0, 2, BATCH).astype(np.float32)
    trainer.step()
    began = time.perf_counter()
    for _ in range(iterations):
        trainer.step()
    del torch
    return iterations / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--pycaffe", metavar="NET")
    args = parser.parse_args()
    if args.pycaffe:
        print(json.dumps({"rate": measure_pycaffe(args.pycaffe, args.iterations)}))
        return
    for name in NETS:
        command = [os.path.join(REPO, "scripts", "caffe-env"), "run", "--", "python3",
                   os.path.join(HERE, "bench_torch_engine.py"), "--pycaffe", name, "--iterations", str(args.iterations)]
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, universal_newlines=True, check=True)
        caffe_rate = json.loads(done.stdout.strip().splitlines()[-1])["rate"]
        torch_rate = measure_torch(name, args.iterations)
        last_rate = measure_torch(name, args.iterations, channels_last=True)
        print(f"{name}, batch {BATCH}, CPU: torch engine {torch_rate:.3f} it/s ({last_rate:.3f} with "
              f"--channels-last), pycaffe {caffe_rate:.3f} it/s, ratio {torch_rate / caffe_rate:.2f}x "
              f"({last_rate / caffe_rate:.2f}x)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
