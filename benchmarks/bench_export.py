"""``caffe-ft export`` time, and ONNX Runtime CPU inference against pycaffe on the exported models.

Run inside the reference environment (it needs pycaffe, onnx and onnxruntime)::

    scripts/caffe-env run -- python3 benchmarks/bench_export.py [--repeat 3]

Two nets: the nsfw ResNet-50 (real weights, 23 MiB) and a VGG16-sized net
(VGG16's deploy layers: 13 convolutions and 3 InnerProducts, 138 million
random weights saved by pycaffe, 528 MiB).  For each:

* export: load the net and caffemodel, convert, check and serialize, write
  the .onnx file (what ``caffe-ft export`` does; best of ``--repeat``);
* inference: images per second at batch 1 and batch 8 (ResNet-50) or batch 1
  (VGG16), the same random input to pycaffe (``net.forward``) and to an ONNX
  Runtime CPU session on the exported model, both with their default
  threading on this machine, in this one process; the outputs are checked to
  agree within 1e-4 relative first.  Reported, no target.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np


NSFW = "/opt/models/nsfw"
MIB = 1 << 20


def _conv(name: str, bottom: str, outputs: int) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f"convolution_param {{ num_output: {outputs} kernel_size: 3 pad: 1 }} }}\n"
            f'layer {{ name: "relu{name[4:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def vgg16() -> str:
    """VGG16's deploy net (Simonyan & Zisserman, configuration D), 224 x 224."""
    text = ['name: "VGG16"\nlayer { name: "data" type: "Input" top: "data" '
            "input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }\n"]
    bottom = "data"
    for block, (outputs, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        for index in range(1, convs + 1):
            name = f"conv{block}_{index}"
            text.append(_conv(name, bottom, outputs))
            bottom = name
        text.append(f'layer {{ name: "pool{block}" type: "Pooling" bottom: "{bottom}" top: "pool{block}" '
                    "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n")
        bottom = f"pool{block}"
    for name, outputs in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        text.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                    f"inner_product_param {{ num_output: {outputs} }} }}\n")
        if name != "fc8":
            text.append(f'layer {{ name: "relu{name[2:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
                        f'layer {{ name: "drop{name[2:]}" type: "Dropout" bottom: "{name}" top: "{name}" }}\n')
        bottom = name
    text.append('layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }\n')
    return "".join(text)


def save_random_model(caffe: Any, proto: str, text: str, weights: str) -> None:
    """``text`` written to ``proto``, and He-initialized random weights (so that
    16 layers neither vanish nor overflow) saved by pycaffe to ``weights``."""
    with open(proto, "w") as handle:
        handle.write(text)
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.default_rng(0)
    for weight, bias in net.params.values():
        fan_in = int(np.prod(weight.data.shape[1:]))
        weight.data[...] = rng.standard_normal(weight.data.shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
        bias.data[...] = 0.01
    net.save(weights)


def export_seconds(net_path: str, weights: str, out: str, repeat: int) -> float:
    """Best wall time of the whole export, files in and out."""
    from caffe_ft.export import to_onnx
    from caffe_ft.formats.caffemodel import load_model
    from caffe_ft.formats.files import load_net, write_atomic
    from caffe_ft.formats.schema import load_schema

    schema = load_schema()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        options = to_onnx.ExportOptions()
        model = to_onnx.export(load_net(net_path, schema), load_model(weights, schema), options,
                               to_onnx.source_metadata(net_path, weights, options))
        write_atomic(out, to_onnx.serialize(model))
        best = min(best, time.perf_counter() - start)
    return best


def rate(run: Callable[[], Any], images: int, seconds: float = 3.0) -> float:
    """Images per second of ``run`` (one warm-up call, then as many as fit in ``seconds``, at least 2)."""
    run()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return calls * images / (time.perf_counter() - start)


def inference(caffe: Any, ort: Any, net_path: str, weights: str, model: str, batches: Tuple[int, ...]) -> List[Dict[str, float]]:
    net = caffe.Net(net_path, weights, caffe.TEST)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = net.inputs[0]
    rows = []
    for batch in batches:
        data = np.random.default_rng(0).uniform(-128, 128, (batch, *net.blobs[name].data.shape[1:])).astype(np.float32)
        net.blobs[name].reshape(*data.shape)
        net.reshape()
        want = net.forward(**{name: data})[net.outputs[0]].copy()
        got = session.run(None, {name: data})[0]
        difference = float(np.abs(got - want).max() / np.abs(want).max())
        assert difference <= 1e-4, f"outputs differ by {difference:.2e}"
        rows.append({
            "batch": batch,
            "pycaffe": rate(lambda: net.forward(**{name: data}), batch),
            "onnxruntime": rate(lambda: session.run(None, {name: data}), batch),
            "difference": difference,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="export runs per net (best is kept)")
    args = parser.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    import onnxruntime

    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as workdir:
        vgg_proto, vgg_weights = os.path.join(workdir, "vgg16.prototxt"), os.path.join(workdir, "vgg16.caffemodel")
        save_random_model(caffe, vgg_proto, vgg16(), vgg_weights)
        nets = [
            ("nsfw ResNet-50", os.path.join(NSFW, "deploy.prototxt"),
             os.path.join(NSFW, "resnet_50_1by2_nsfw.caffemodel"), (1, 8)),
            ("VGG16-sized", vgg_proto, vgg_weights, (1,)),
        ]
        print(f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs")
        for label, proto, weights, batches in nets:
            model = os.path.join(workdir, "model.onnx")
            seconds = export_seconds(proto, weights, model, args.repeat)
            print(f"{label}: caffemodel {os.path.getsize(weights) / MIB:.1f} MiB -> onnx "
                  f"{os.path.getsize(model) / MIB:.1f} MiB, export {seconds:.2f} s")
            for row in inference(caffe, onnxruntime, proto, weights, model, batches):
                print(f"  batch {row['batch']}: pycaffe {row['pycaffe']:.2f} img/s, onnxruntime "
                      f"{row['onnxruntime']:.2f} img/s, ratio {row['onnxruntime'] / row['pycaffe']:.2f}x "
                      f"(outputs within {row['difference']:.1e})")


if __name__ == "__main__":
    main()
