"""Reference forward and backward passes from real Caffe for the torch engine's layer tests.

Runs inside the reference environment (``scripts/caffe-env run -- python3
tests/training/torch_layers_ref.py layers DIR``), where pycaffe is; the tests on
the host (tests/training/test_torch_layers.py) read what it writes.  Python 3.9,
no caffe-ft imports.

layers DIR: for each entry of DIR/nets.json (name; prototxt, a file in DIR;
phase; passes; inputs {top: nested list}; hdf5 {file: {dataset: nested list}};
binaryproto {file: nested list}), first writes those files into DIR, then builds the net (working in DIR), fills every
parameter blob with seeded normal values, writes DIR/NAME/weights.caffemodel and,
per pass K, feeds the Input tops from the inputs NPZ, runs forward and backward
and writes DIR/NAME/pass_K.npz: every blob's data ("blob:NAME") and every
parameter blob's gradient ("grad:LAYER/I").

resume DIR: DIR/solver.prototxt (net, data and the torch engine's snapshot
torch_iter_10.* beside it, relative to DIR): ``caffe train -snapshot`` (the
CLI) continues that snapshot to max_iter with snapshot_prefix "cli", and pycaffe
(Solver.restore, step) does the same; writes DIR/cli.npz and DIR/pycaffe.npz,
every parameter blob ("LAYER/I") of each.
"""

import json
import re
import subprocess
import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402


def write_hdf5(out, files):
    for name, datasets in files.items():
        with h5py.File(os.path.join(out, name), "w") as handle:
            for key, values in datasets.items():
                handle.create_dataset(key, data=np.asarray(values, np.float32))


def layers(out):
    os.chdir(out)  # sources are named relative to DIR
    caffe.set_mode_cpu()
    with open("nets.json") as handle:
        entries = json.load(handle)
    for entry in entries:
        write_hdf5(out, entry.get("hdf5", {}))
        for name, values in entry.get("binaryproto", {}).items():
            with open(os.path.join(out, name), "wb") as handle:
                handle.write(caffe.io.array_to_blobproto(np.asarray(values, np.float32)).SerializeToString())
        where = os.path.join(out, entry["name"])
        if not os.path.isdir(where):
            os.makedirs(where)
        phase = caffe.TRAIN if entry.get("phase") == "TRAIN" else caffe.TEST
        net = caffe.Net(entry["prototxt"], phase)
        rng = np.random.default_rng(5)
        for blobs in net.params.values():
            for blob in blobs:
                blob.data[...] = rng.normal(0, 1, blob.data.shape)
        net.save(os.path.join(where, "weights.caffemodel"))
        inputs = entry.get("inputs", {})
        for index in range(entry.get("passes", 1)):
            for name in net.inputs:
                net.blobs[name].data[...] = np.asarray(inputs[name], np.float32)
            for blobs in net.params.values():
                for blob in blobs:
                    blob.diff[...] = 0
            net.forward()
            net.backward()
            saved = {"blob:" + name: blob.data.copy() for name, blob in net.blobs.items()}
            for name, blobs in net.params.items():
                for i, blob in enumerate(blobs):
                    saved["grad:%s/%d" % (name, i)] = blob.diff.copy()
            np.savez(os.path.join(where, "pass_%d.npz" % index), **saved)
        del net  # closes what the net writes (HDF5Output's file)


def params_of(net):
    return {"%s/%d" % (name, i): blob.data.copy() for name, blobs in net.params.items() for i, blob in enumerate(blobs)}


def resume(out):
    os.chdir(out)
    with open("solver.prototxt") as handle:
        text = handle.read()
    with open("solver_cli.prototxt", "w") as handle:
        handle.write(text + '\nsnapshot_prefix: "cli"\n')
    done = subprocess.run(["caffe", "train", "-solver", "solver_cli.prototxt", "-snapshot", "torch_iter_10.solverstate"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if done.returncode:
        raise SystemExit("caffe train failed:\n" + done.stdout[-3000:])
    caffe.set_mode_cpu()
    solver = caffe.get_solver("solver_cli.prototxt")
    max_iter = int(re.search(r"max_iter: *(\d+)", text).group(1))
    cli = caffe.Net("net.prototxt", caffe.TRAIN, weights="cli_iter_%d.caffemodel" % max_iter)
    np.savez("cli.npz", **params_of(cli))
    solver.restore("torch_iter_10.solverstate")
    while solver.iter < max_iter:
        solver.step(1)
    np.savez("pycaffe.npz", **params_of(solver.net))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "layers":
        layers(out)
    elif mode == "resume":
        resume(out)
    else:
        raise SystemExit("unknown mode " + mode)
    with open(os.path.join(out, mode + ".done"), "w") as handle:
        handle.write("ok\n")
