"""Torch engine vs pycaffe: training iterations per second on the CPU.

CaffeNet and the nsfw ResNet-50 (deploy nets with their Softmax replaced by
SoftmaxWithLoss on an Input label), batch 16, SGD with momentum and weight
decay, the same random data every iteration.  Four contestants per net, in
the same run:

- the torch engine as it trains by default (channels-last on the CPU);
- the torch engine with ``--no-channels-last``;
- a plain PyTorch module of the same net, torchvision-style (``nn.Conv2d``,
  ``nn.BatchNorm2d`` for each BatchNorm+Scale pair, ``nn.ReLU``, ``+``,
  ``nn.LocalResponseNorm``, ``nn.Linear``, ``torch.optim.SGD``), channels-last:
  what PyTorch itself reaches on this machine, the ceiling of the engine;
- pycaffe (OpenBLAS) in the reference environment, in a child process that
  this script starts there and keeps waiting between its iterations.

Both torches run with the engine's OpenMP setting (``OMP_WAIT_POLICY=PASSIVE``
unless set: threads that sleep, not spin, while they wait; see
caffe_ft/training/torch/__init__.py); pycaffe with its own defaults.

The machine is shared and noisy, so the contestants take turns, one timed
iteration each per round after a warm-up, each round starting with the next
contestant (what runs right after pycaffe is slowed by its OpenBLAS threads,
which spin for a while after each step), and each rate is the median over
the rounds (pycaffe's includes the relay to its child, a millisecond); the
load average is printed with the figures.

    CAFFE_FT_ROOT=... .venv/bin/python benchmarks/bench_torch_engine.py [--rounds 8] [--nets caffenet,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BATCH = 16
NETS = {
    "caffenet": "/usr/share/doc/caffe-doc/models/bvlc_reference_caffenet/deploy.prototxt",
    "nsfw_resnet50": "/opt/models/nsfw/deploy.prototxt",
}
SOLVER = 'net: "{net}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n' \
         'max_iter: 100000\nsolver_mode: CPU\nsnapshot_after_train: false\n'
#: What the pycaffe child prints before each answer (caffe-env may print its own lines first).
MARK = "BENCH "


def train_net(deploy_text: str) -> str:
    """The deploy net with batch 16, a label Input and SoftmaxWithLoss instead of its Softmax."""
    text = re.sub(r"dim:\s*\d+", "dim: %d" % BATCH, deploy_text, count=1)
    blocks = text.split("layer {")
    last = blocks[-1]
    found = re.search(r'bottom:\s*"([^"]+)"', last)
    assert found is not None
    blocks[-1] = (' name: "loss" type: "SoftmaxWithLoss" bottom: "%s" bottom: "label" top: "loss" }\n'
                  % found.group(1))
    head = blocks[0]
    label = 'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: %d } } }\n' % BATCH
    return head + label + "layer {".join([""] + blocks[1:])


# ------------------------------------------------------------------ pycaffe --


def serve_pycaffe(name: str) -> None:
    """In the reference environment: one timed ``solver.step(1)`` per line read from stdin."""
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
    data_name = [blob for blob in solver.net.inputs if blob != "label"][0]
    solver.net.blobs[data_name].data[...] = rng.normal(0, 1, solver.net.blobs[data_name].data.shape)
    solver.net.blobs["label"].data[...] = rng.integers(0, 2, BATCH)
    solver.step(1)
    print(MARK + json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        began = time.perf_counter()
        solver.step(1)
        print(MARK + json.dumps({"seconds": time.perf_counter() - began}), flush=True)


class PycaffeChild:
    """The pycaffe side, kept alive in the reference environment between its turns."""

    def __init__(self, name: str) -> None:
        command = [os.path.join(REPO, "scripts", "caffe-env"), "run", "--", "python3",
                   os.path.join(HERE, "bench_torch_engine.py"), "--pycaffe", name]
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        universal_newlines=True)
        self._answer()

    def _answer(self) -> Dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MARK):
                return dict(json.loads(line[len(MARK):]))
        raise RuntimeError(f"the pycaffe child ended (exit status {self.process.wait()})")

    def step(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._answer()["seconds"])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


# -------------------------------------------------------------------- torch --


def _messages(name: str) -> Any:
    from caffe_ft.formats import prototext
    from caffe_ft.formats.schema import load_schema

    schema = load_schema()
    root = os.environ.get("CAFFE_FT_ROOT", "/var/cache/caffe-ft/bullseye").rstrip("/")
    with open(root + NETS[name]) as handle:
        text = train_net(handle.read())
    net = prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter"))
    solver = prototext.to_message(prototext.parse(SOLVER.format(net="net.prototxt").encode()),
                                  schema.new("SolverParameter"))
    return schema, net, solver


def engine_step(name: str, channels_last: bool) -> Callable[[], Any]:
    """One iteration of the torch engine's Trainer on the net (fed through an Input feed)."""
    import numpy as np

    from caffe_ft.training.nets import NetSpec
    from caffe_ft.training.torch.engine import Trainer

    schema, net, solver = _messages(name)
    rng = np.random.default_rng(0)
    data_name = next(layer.top[0] for layer in net.layer if layer.type == "Input" and layer.top[0] != "label")
    arrays: Dict[str, Any] = {}
    trainer = Trainer(solver, schema, NetSpec(net, "TRAIN", (), 0, "net"), [], feeds=[lambda index: arrays],
                      channels_last=channels_last)
    arrays[data_name] = rng.normal(0, 1, trainer.net.shapes.blobs[data_name]).astype(np.float32)
    arrays["label"] = rng.integers(0, 2, BATCH).astype(np.float32)
    return trainer.step


def plain_step(name: str) -> Callable[[], Any]:
    """One iteration of a plain PyTorch module of the same net (channels-last, torch.optim.SGD)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from caffe_ft.net.shapes import infer

    schema, net, solver = _messages(name)
    blobs = infer(net, "TRAIN").blobs
    modules = nn.ModuleDict()
    ops: List[Any] = []
    layers = [layer for layer in net.layer if layer.type != "Input"]
    index = 0
    while index < len(layers):
        layer = layers[index]
        kind, bottom, top = layer.type, list(layer.bottom), layer.top[0] if len(layer.top) else "loss"
        channels = blobs[bottom[0]][1] if bottom else 0
        if kind == "Convolution":
            p = layer.convolution_param
            modules[layer.name] = nn.Conv2d(channels, p.num_output, p.kernel_size[0],
                                            p.stride[0] if len(p.stride) else 1, p.pad[0] if len(p.pad) else 0,
                                            groups=p.group, bias=p.bias_term)
        elif kind == "BatchNorm":  # with the Scale after it
            norm = nn.BatchNorm2d(channels, eps=layer.batch_norm_param.eps)
            modules[layer.name] = norm.eval() if layer.batch_norm_param.use_global_stats else norm
            index += 1
        elif kind == "Pooling":
            p = layer.pooling_param
            pool = nn.MaxPool2d if p.pool == p.MAX else nn.AvgPool2d
            modules[layer.name] = pool(p.kernel_size, p.stride, p.pad, ceil_mode=True)
        elif kind == "LRN":
            p = layer.lrn_param
            modules[layer.name] = nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k)
        elif kind == "InnerProduct":
            features = int(torch.tensor(blobs[bottom[0]][1:]).prod())
            modules[layer.name] = nn.Sequential(nn.Flatten(), nn.Linear(features, layer.inner_product_param.num_output))
        elif kind == "Dropout":
            modules[layer.name] = nn.Dropout(layer.dropout_param.dropout_ratio)
        elif kind == "ReLU":
            modules[layer.name] = nn.ReLU(inplace=True)
        elif kind not in ("Eltwise", "SoftmaxWithLoss"):
            raise ValueError(f"the plain module has no {kind}")
        ops.append((layer.name, kind, bottom, top))
        index += 1

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = modules

        def forward(self, values: Dict[str, Any]) -> Any:
            values = dict(values)
            for layer_name, kind, bottom, top in ops:
                if kind == "Eltwise":
                    values[top] = values[bottom[0]] + values[bottom[1]]
                elif kind == "SoftmaxWithLoss":
                    values[top] = F.cross_entropy(values[bottom[0]], values[bottom[1]])
                else:
                    values[top] = self.layers[layer_name](values[bottom[0]])
            return values["loss"]

    module = Plain().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(module.parameters(), lr=solver.base_lr, momentum=solver.momentum,
                                weight_decay=solver.weight_decay)
    data_name = next(layer.top[0] for layer in net.layer if layer.type == "Input" and layer.top[0] != "label")
    generator = torch.Generator().manual_seed(0)
    inputs = {data_name: torch.randn(blobs[data_name], generator=generator).contiguous(
        memory_format=torch.channels_last), "label": torch.randint(0, 2, (BATCH,), generator=generator)}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module(inputs).backward()
        optimizer.step()

    return step


# --------------------------------------------------------------------- main --


def measure(name: str, rounds: int) -> Dict[str, float]:
    """Seconds per iteration of each contestant: medians over ``rounds`` turns."""
    import torch

    pycaffe = PycaffeChild(name)
    try:
        contestants: Dict[str, Callable[[], Any]] = {
            "engine": engine_step(name, channels_last=True),
            "engine_contiguous": engine_step(name, channels_last=False),
            "plain": plain_step(name),
        }
        for step in contestants.values():
            step()
        contestants["pycaffe"] = pycaffe.step
        order = list(contestants)
        times: Dict[str, List[float]] = {key: [] for key in order}
        for turn in range(rounds):
            # Each round starts one further along: whoever follows pycaffe meets its OpenBLAS threads
            # still spinning after their step, so that seat rotates.
            for key in order[turn % len(order):] + order[:turn % len(order)]:
                began = time.perf_counter()
                contestants[key]()
                times[key].append(time.perf_counter() - began)
    finally:
        pycaffe.close()
    del torch
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--pycaffe", metavar="NET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pycaffe:
        serve_pycaffe(args.pycaffe)
        return
    import caffe_ft.training.torch  # noqa: F401  (before torch: the engine's OpenMP wait policy, for both torches)
    import torch

    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"median of {args.rounds} alternating iterations")
    for name in args.nets.split(","):
        before = os.getloadavg()[0]
        seconds = measure(name, args.rounds)
        rate = {key: 1.0 / value for key, value in seconds.items()}
        base = rate["pycaffe"]
        print(f"{name}, batch {BATCH}, CPU, load {before:.1f}-{os.getloadavg()[0]:.1f}: "
              f"torch engine {rate['engine']:.3f} it/s ({rate['engine_contiguous']:.3f} with --no-channels-last), "
              f"plain torch {rate['plain']:.3f} it/s, pycaffe {base:.3f} it/s; ratio {rate['engine'] / base:.2f}x "
              f"({rate['engine_contiguous'] / base:.2f}x); plain torch {rate['plain'] / base:.2f}x; "
              f"engine / plain torch {rate['engine'] / rate['plain']:.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
