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
"""

import json
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


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode != "layers":
        raise SystemExit("unknown mode " + mode)
    layers(out)
    with open(os.path.join(out, mode + ".done"), "w") as handle:
        handle.write("ok\n")
