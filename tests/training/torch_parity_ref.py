"""Reference arrays from real Caffe for the torch engine's parity tests.

Runs inside the reference environment (``scripts/caffe-env run -- python3
tests/training/torch_parity_ref.py MODE DIR``), where pycaffe is; the tests on the host
(where torch is) read what it writes.  Python 3.9, no caffe-ft imports.

forward DIR: for each entry of DIR/nets.json (name, prototxt (relative to DIR or absolute), weights or
  null, batch, and optionally phase, stages, inputs {top: C,H,W...} and
  labels {top: classes}), writes DIR/NAME/net.prototxt (the net with its
  Input batch set, and its data layers made Input layers of the given
  shapes), weights.caffemodel (the given weights, or seeded random ones) and
  blobs.npz (every blob after one forward pass in the entry's phase, TEST by
  default, of seeded random input and labels).
train DIR: DIR/net.prototxt (Input tops data and label), DIR/data.npz
  (data_i, label_i per iteration; unused when the net has Data layers,
  whose sources are relative to DIR) and DIR/solvers.json (name -> solver
  fields as prototxt text); writes DIR/init.caffemodel once (Caffe's fillers),
  then per solver DIR/NAME/: snapshots at iterations 10 and 20 and
  params.npz (every learnable blob after 20 iterations).
resume DIR MARK NAME STATE [NAME STATE...]: restores each STATE in pycaffe
  with solver NAME of DIR and trains on to iteration 20; writes
  DIR/NAME/resumed.npz, then DIR/MARK.done.
"""

import gzip
import json
import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe  # noqa: E402
import numpy as np  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402
from google.protobuf import text_format  # noqa: E402


def read_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return handle.read()


def save_blobs(path, names, arrays):
    np.savez(path, names=np.array(names), **{"b%d" % i: a for i, a in enumerate(arrays)})


DATA_LAYERS = ("Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData")


def as_input(layer, entry):
    """A data layer turned into an Input layer of the entry's shapes (same name, tops, rules)."""
    new = caffe_pb2.LayerParameter()
    new.name, new.type = layer.name, "Input"
    new.top.extend(layer.top)
    new.include.extend(layer.include)
    new.exclude.extend(layer.exclude)
    for top in layer.top:
        dims = [entry["batch"]] + list(entry.get("inputs", {}).get(top, []))
        new.input_param.shape.add().dim.extend(dims)
    return new


def random_weights(net, rng):
    types = dict(zip(net._layer_names, [layer.type for layer in net.layers]))
    for name, blobs in net.params.items():
        if types.get(name) == "BatchNorm":
            channels = blobs[0].data.shape
            blobs[2].data[...] = rng.uniform(1, 5)
            blobs[0].data[...] = rng.normal(0, 0.5, channels) * blobs[2].data[0]
            blobs[1].data[...] = rng.uniform(0.5, 2, channels) * blobs[2].data[0]
            continue
        for index, blob in enumerate(blobs):
            shape = blob.data.shape
            if len(shape) > 1:
                fan_in = blob.data.size // shape[0]
                blob.data[...] = rng.normal(0, 1.0 / np.sqrt(fan_in), shape)
            else:
                blob.data[...] = rng.normal(0, 0.1, shape)


def forward(out):
    with open(os.path.join(out, "nets.json")) as handle:
        entries = json.load(handle)
    caffe.set_mode_cpu()
    for entry in entries:
        where = os.path.join(out, entry["name"])
        os.makedirs(where, exist_ok=True)
        param = caffe_pb2.NetParameter()
        text_format.Merge(read_text(os.path.join(out, entry["prototxt"])), param)
        for index, layer in enumerate(param.layer):
            if layer.type == "Input":
                for shape in layer.input_param.shape:
                    shape.dim[0] = entry["batch"]
            elif layer.type in DATA_LAYERS:
                param.layer[index].CopyFrom(as_input(layer, entry))
        phase = caffe.TRAIN if entry.get("phase") == "TRAIN" else caffe.TEST
        stages = entry.get("stages", [])
        net_path = os.path.join(where, "net.prototxt")
        with open(net_path, "w") as handle:
            handle.write(text_format.MessageToString(param))
        rng = np.random.default_rng(7)
        if entry["weights"]:
            net = caffe.Net(net_path, phase, weights=entry["weights"], stages=stages)
        else:
            net = caffe.Net(net_path, phase, stages=stages)
            random_weights(net, rng)
        net.save(os.path.join(where, "weights.caffemodel"))
        labels = entry.get("labels", {})
        for name in net.inputs:
            shape = net.blobs[name].data.shape
            if name in labels:
                net.blobs[name].data[...] = rng.integers(0, labels[name], shape)
            else:
                net.blobs[name].data[...] = rng.normal(0, 1, shape)
        net.forward()
        names = list(net.blobs)
        save_blobs(os.path.join(where, "blobs.npz"), names, [net.blobs[n].data.copy() for n in names])


def solver_for(out, name, prefix):
    with open(os.path.join(out, "solvers.json")) as handle:
        fields = json.load(handle)[name]
    path = os.path.join(out, name, "solver.prototxt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write('net: "%s"\nsnapshot_prefix: "%s"\nsolver_mode: CPU\n%s\n'
                     % (os.path.join(out, "net.prototxt"), prefix, fields))
    return caffe.get_solver(path)


def feed(solver, data, iteration):
    if "data" not in solver.net.inputs:  # the net reads its own data (Data layers)
        return
    solver.net.blobs["data"].data[...] = data["data_%d" % iteration]
    solver.net.blobs["label"].data[...] = data["label_%d" % iteration]


def dump_params(net, path):
    names, arrays = [], []
    for name, blobs in net.params.items():
        for index, blob in enumerate(blobs):
            names.append("%s/%d" % (name, index))
            arrays.append(blob.data.copy())
    save_blobs(path, names, arrays)


def train(out):
    os.chdir(out)  # data layers name their sources relative to DIR
    caffe.set_mode_cpu()
    init = os.path.join(out, "init.caffemodel")
    if not os.path.exists(init):
        caffe.set_random_seed(1)
        caffe.Net(os.path.join(out, "net.prototxt"), caffe.TRAIN).save(init)
    data = np.load(os.path.join(out, "data.npz"))
    with open(os.path.join(out, "solvers.json")) as handle:
        names = list(json.load(handle))
    for name in names:
        solver = solver_for(out, name, os.path.join(out, name, "caffe"))
        solver.net.copy_from(init)
        while solver.iter < 20:
            feed(solver, data, solver.iter)
            solver.step(1)
            if solver.iter == 10:
                solver.snapshot()
        solver.snapshot()
        dump_params(solver.net, os.path.join(out, name, "params.npz"))


def resume(out, name, state):
    os.chdir(out)
    caffe.set_mode_cpu()
    data = np.load(os.path.join(out, "data.npz"))
    solver = solver_for(out, name, os.path.join(out, name, "resumed"))
    solver.restore(state)
    while solver.iter < 20:
        feed(solver, data, solver.iter)
        solver.step(1)
    dump_params(solver.net, os.path.join(out, name, "resumed.npz"))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "forward":
        forward(out)
    elif mode == "train":
        train(out)
    else:
        pairs = sys.argv[4:]
        for index in range(0, len(pairs), 2):
            resume(out, pairs[index], pairs[index + 1])
        mode = sys.argv[3]
    with open(os.path.join(out, mode + ".done"), "w") as handle:
        handle.write("ok\n")
