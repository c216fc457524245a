"""Binary Caffe I/O: caffemodels, mean files and solver states.

Host tests build files with protobuf's own serializer from our schema (which
writes fields in C++'s order), so "byte-identical" and "same values" are
checked against protobuf, not against our reader.  Tests marked ``caffe``
check the same against pycaffe inside the reference environment.
"""

from __future__ import annotations

import errno
import glob
import os
import struct

import numpy as np
import pytest

from caffe_ft.formats import caffemodel, wire as wirecodec
from caffe_ft.formats.caffemodel import Blob, load_blob, load_model, load_solverstate, save_blob, save_model
from caffe_ft.errors import CaffeFtError
from caffe_ft.formats.schema import load_schema

from conftest import NSFW_DIR

RNG = np.random.default_rng(7)


def _fill(proto, array, legacy=False, diff=None):
    """Fill a BlobProto message the way Caffe's ToProto (or an old Caffe) would."""
    array = np.asarray(array)
    if legacy:
        proto.num, proto.channels, proto.height, proto.width = array.shape
    else:
        proto.shape.dim.extend(array.shape)
    double = array.dtype == np.float64
    (proto.double_data if double else proto.data).extend(array.ravel().tolist())
    if diff is not None:
        (proto.double_diff if double else proto.diff).extend(np.ravel(diff).tolist())
    return proto


def _weights(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _current_net(schema):
    """A small current-format net with weights, and the arrays it holds by layer."""
    net = schema.new("NetParameter")
    net.name = "small"
    arrays = {"conv1": [_weights(4, 3, 3, 3), _weights(4)], "fc": [_weights(5, 36), _weights(5)]}
    for name, kind in (("data", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("fc", "InnerProduct")):
        layer = net.layer.add()
        layer.name, layer.type = name, kind
        layer.phase = 1  # TEST
        for array in arrays.get(name, []):
            _fill(layer.blobs.add(), array)
    net.layer[1].convolution_param.num_output = 4
    net.layer[1].param.add().lr_mult = 1.0
    net.layer[1].include.add().stage.append("deploy")
    net.layer[3].inner_product_param.num_output = 5
    return net, arrays


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _round_trip(tmp_path, schema, data, name="in.caffemodel"):
    """Load ``data`` from a file, save it, and return (model, bytes written)."""
    model = load_model(_write(tmp_path, name, data), schema)
    out = tmp_path / ("out-" + name)
    save_model(model, str(out))
    return model, out.read_bytes()


def test_current_format_round_trip_is_byte_identical(tmp_path, schema):
    net, arrays = _current_net(schema)
    data = net.SerializeToString()
    model, written = _round_trip(tmp_path, schema, data)
    assert written == data
    assert model.layer_field == "layer" and not model.v0
    by_name = model.layer_blobs()
    assert set(by_name) == {"data", "conv1", "relu1", "fc"}
    for name, expected in arrays.items():
        assert [blob.shape for blob in by_name[name]] == [a.shape for a in expected]
        for blob, array in zip(by_name[name], expected):
            assert blob.data.dtype == np.float32 and blob.diff is None
            np.testing.assert_array_equal(blob.data, array)


def test_net_keeps_every_field_but_blobs(tmp_path, schema):
    net, _ = _current_net(schema)
    model = load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)
    for layer in net.layer:
        del layer.blobs[:]
    assert model.net == net


def test_blobs_are_read_only_views_on_the_file(tmp_path, schema):
    net, _ = _current_net(schema)
    model = load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)
    data = model.blobs[1][0].data
    assert not data.flags.writeable
    assert not data.flags.owndata


def test_counts_and_sizes(tmp_path, schema):
    net, arrays = _current_net(schema)
    net.layer[3].blobs[0].diff.extend(np.ones(5 * 36).tolist())
    model = load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)
    all_arrays = [a for group in arrays.values() for a in group]
    assert model.param_count == sum(a.size for a in all_arrays)
    assert model.nbytes == sum(a.nbytes for a in all_arrays) + 5 * 36 * 4
    np.testing.assert_array_equal(model.layer_blobs()["fc"][0].diff, np.ones((5, 36), np.float32))


def test_modified_blob_is_written(tmp_path, schema):
    net, arrays = _current_net(schema)
    model = load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)
    new = _weights(5, 36, dtype=np.float64)
    model.blobs[3][0] = Blob.of(new.astype(np.float32))
    model.blobs[3].append(Blob.of(np.array([2.5, -1.0])))  # float64 stays double
    path = tmp_path / "changed.caffemodel"
    save_model(model, str(path))
    reread = schema.new("NetParameter")
    reread.ParseFromString(path.read_bytes())
    fc = reread.layer[3]
    np.testing.assert_array_equal(np.array(fc.blobs[0].data, np.float32).reshape(5, 36), new.astype(np.float32))
    assert list(fc.blobs[2].double_data) == [2.5, -1.0] and not fc.blobs[2].data
    np.testing.assert_array_equal(np.array(reread.layer[1].blobs[0].data, np.float32), arrays["conv1"][0].ravel())


def test_save_over_the_file_it_was_loaded_from(tmp_path, schema):
    net, _ = _current_net(schema)
    data = net.SerializeToString()
    path = _write(tmp_path, "m.caffemodel", data)
    model = load_model(path, schema)
    save_model(model, path)
    assert open(path, "rb").read() == data
    assert os.listdir(tmp_path) == ["m.caffemodel"]


def test_double_data_and_diff(tmp_path, schema):
    net = schema.new("NetParameter")
    layer = net.layer.add()
    layer.name = "fc"
    weights, diff = _weights(3, 2, dtype=np.float64), _weights(3, 2, dtype=np.float64)
    _fill(layer.blobs.add(), weights, diff=diff)
    model, written = _round_trip(tmp_path, schema, net.SerializeToString())
    assert written == net.SerializeToString()
    blob = model.blobs[0][0]
    assert blob.data.dtype == np.float64 and blob.diff.dtype == np.float64
    np.testing.assert_array_equal(blob.data, weights)
    np.testing.assert_array_equal(blob.diff, diff)


def test_legacy_4d_blob(tmp_path, schema):
    net = schema.new("NetParameter")
    layer = net.layer.add()
    layer.name = "conv"
    weights = _weights(2, 3, 1, 4)
    _fill(layer.blobs.add(), weights, legacy=True)
    partial = layer.blobs.add()  # only some legacy fields: the others read as 0
    partial.num, partial.channels = 3, 2
    model, written = _round_trip(tmp_path, schema, net.SerializeToString())
    assert written == net.SerializeToString()
    full, zero = model.blobs[0]
    assert full.shape == (2, 3, 1, 4) and not full.shape_field
    assert full.legacy_dims == ("num", "channels", "height", "width")
    np.testing.assert_array_equal(full.data, weights)
    assert zero.shape == (3, 2, 0, 0) and zero.data.size == 0 and zero.legacy_dims == ("num", "channels")


def test_scalar_and_empty_blobs(tmp_path, schema):
    net = schema.new("NetParameter")
    layer = net.layer.add()
    layer.name = "bn"
    layer.blobs.add().data.append(0.5)  # no shape at all: a scalar, as Caffe writes one
    layer.blobs.add().shape.dim.append(0)  # zero values
    model, written = _round_trip(tmp_path, schema, net.SerializeToString())
    assert written == net.SerializeToString()
    scalar, empty = model.blobs[0]
    assert scalar.shape == () and float(scalar.data) == 0.5 and not scalar.shape_field
    assert empty.shape == (0,) and empty.data.size == 0


def _key(field, wire):
    return wirecodec.varint_bytes(field << 3 | wire)


def _bytes_field(field, payload):
    return _key(field, 2) + wirecodec.varint_bytes(len(payload)) + payload


def _unpacked(field, values, fmt="<f"):
    wire = 5 if fmt == "<f" else 1
    return b"".join(_key(field, wire) + struct.pack(fmt, v) for v in values)


@pytest.mark.parametrize("split", [0, 1, 7, 20])
def test_packed_and_unpacked_encodings_read_alike(tmp_path, schema, split):
    """Protobuf accepts a repeated field in any mix of packed and unpacked runs."""
    values = _weights(20)
    dims = b"".join(_key(1, 0) + wirecodec.varint_bytes(d) for d in (4, 5))  # unpacked dims
    body = (
        _bytes_field(7, dims)
        + _unpacked(5, values[:split])
        + _bytes_field(5, values[split:].tobytes())
        + _unpacked(6, values[::-1])
    )
    blob_bytes = body
    expected = schema.new("BlobProto")
    expected.ParseFromString(blob_bytes)
    data = _bytes_field(100, _bytes_field(1, b"ip") + _bytes_field(7, blob_bytes))
    model = load_model(_write(tmp_path, "m.caffemodel", data), schema)
    blob = model.blobs[0][0]
    assert blob.shape == tuple(expected.shape.dim) == (4, 5)
    np.testing.assert_array_equal(blob.data.ravel(), np.array(expected.data, np.float32))
    np.testing.assert_array_equal(blob.diff.ravel(), np.array(expected.diff, np.float32))
    # Written back in Caffe's (packed) encoding, which protobuf reads as the same blob.
    out = tmp_path / "out.caffemodel"
    save_model(model, str(out))
    reread = schema.new("NetParameter")
    reread.ParseFromString(out.read_bytes())
    assert reread.layer[0].blobs[0] == expected
    assert reread.SerializeToString() == out.read_bytes()


def test_unpacked_doubles(tmp_path, schema):
    values = _weights(6, dtype=np.float64)
    blob_bytes = _bytes_field(7, _bytes_field(1, b"\x06")) + _unpacked(8, values, "<d")
    path = _write(tmp_path, "mean.binaryproto", blob_bytes)
    blob = load_blob(path, schema)
    assert blob.data.dtype == np.float64
    np.testing.assert_array_equal(blob.data, values)


def test_strided_and_converted_arrays_are_written_in_chunks(tmp_path, schema, monkeypatch):
    monkeypatch.setattr(caffemodel, "_WRITE_CHUNK", 7)
    transposed = _weights(9, 5).T  # not contiguous
    big_endian = _weights(3, 4).astype(">f4")
    half = _weights(11).astype(np.float16)
    for array in (transposed, big_endian, half):
        path = str(tmp_path / "b.binaryproto")
        save_blob(Blob.of(array) if array.dtype == np.float16 else Blob(array.shape, array), path)
        proto = schema.new("BlobProto")
        proto.ParseFromString(open(path, "rb").read())
        assert tuple(proto.shape.dim) == array.shape
        np.testing.assert_array_equal(np.array(proto.data, np.float32).reshape(array.shape), array.astype(np.float32))


def _mixed_model_file(tmp_path, schema):
    """A file with float and double blobs, a diff, a legacy 4-D blob and a V1-free current net."""
    net, _ = _current_net(schema)
    extra = net.layer.add()
    extra.name, extra.type = "extra", "Scale"
    _fill(extra.blobs.add(), _weights(2, 3, dtype=np.float64), diff=_weights(2, 3, dtype=np.float64))
    _fill(extra.blobs.add(), _weights(1, 2, 1, 3), legacy=True)
    _fill(extra.blobs.add(), _weights(7), diff=_weights(7))
    data = net.SerializeToString()
    return _write(tmp_path, "m.caffemodel", data), data


def _copied(model):
    """``model`` with every array copied into memory: saving it re-encodes every blob."""
    def copy(blob):
        return Blob(blob.shape, np.array(blob.data), None if blob.diff is None else np.array(blob.diff),
                    blob.legacy_dims, blob.shape_field)
    return caffemodel.Model(model.net, [[copy(blob) for blob in blobs] for blobs in model.blobs], model.v0)


def test_unchanged_blobs_are_copied_file_to_file_as_a_full_re_encode_writes_them(tmp_path, schema):
    path, data = _mixed_model_file(tmp_path, schema)
    model = load_model(path, schema)
    arrays = [a for blobs in model.blobs for blob in blobs for a in (blob.data, blob.diff) if a is not None]
    assert len(arrays) == 9
    assert all(caffemodel._file_range(a, a.dtype.newbyteorder("<")) is not None for a in arrays)
    copies = _copied(model)
    assert not any(caffemodel._file_range(b.data, b.data.dtype) for blobs in copies.blobs for b in blobs)
    save_model(model, str(tmp_path / "streamed.caffemodel"))
    save_model(copies, str(tmp_path / "encoded.caffemodel"))
    streamed = (tmp_path / "streamed.caffemodel").read_bytes()
    assert streamed == (tmp_path / "encoded.caffemodel").read_bytes() == data
    # A changed blob among unchanged ones; a view that is not the file's bytes in order is re-encoded.
    model.blobs[3][0] = Blob.of(_weights(5, 36))
    model.blobs[1][0] = Blob((3, 3, 3, 4), model.blobs[1][0].data.transpose(1, 2, 3, 0))
    assert caffemodel._file_range(model.blobs[1][0].data, np.dtype("<f4")) is None
    save_model(model, str(tmp_path / "streamed.caffemodel"))
    save_model(_copied(model), str(tmp_path / "encoded.caffemodel"))
    assert (tmp_path / "streamed.caffemodel").read_bytes() == (tmp_path / "encoded.caffemodel").read_bytes()


def test_blobs_at_other_page_offsets_go_through_a_small_buffer(tmp_path, schema, monkeypatch):
    """A longer header before the blobs (init's output names other layers than
    its input) puts every blob at another offset within a page than in the
    input: those are copied through a buffer that stays in the CPU's cache
    (the kernel's copy would shift every page), byte for byte as a re-encode."""
    path, _ = _mixed_model_file(tmp_path, schema)
    model = load_model(path, schema)
    model.net.name = "a longer name shifts every blob by a few bytes"

    def shifted(*args):
        raise AssertionError("a kernel copy across page offsets")

    monkeypatch.setattr(os, "copy_file_range", shifted)
    monkeypatch.setattr(os, "sendfile", shifted)
    monkeypatch.setattr(caffemodel, "_COPY_BUFFER", 16)  # many rounds, and a last short one
    save_model(model, str(tmp_path / "streamed.caffemodel"))
    monkeypatch.undo()
    save_model(_copied(model), str(tmp_path / "encoded.caffemodel"))
    streamed = (tmp_path / "streamed.caffemodel").read_bytes()
    assert streamed == (tmp_path / "encoded.caffemodel").read_bytes()
    assert load_model(str(tmp_path / "streamed.caffemodel"), schema).net.name == model.net.name


@pytest.mark.parametrize("missing", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_kernels_without_file_to_file_copies(tmp_path, schema, monkeypatch, missing):
    """Where the kernel refuses copy_file_range (and sendfile), the blobs are written from the map."""
    path, data = _mixed_model_file(tmp_path, schema)
    model = load_model(path, schema)

    def refused(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    for name in missing:
        monkeypatch.setattr(os, name, refused)
    save_model(model, str(tmp_path / "out.caffemodel"))
    assert (tmp_path / "out.caffemodel").read_bytes() == data


def _v1_net(schema):
    net = schema.new("NetParameter")
    net.name = "old"
    net.input.append("data")
    net.input_dim.extend([1, 3, 4, 4])
    arrays = [_weights(2, 3, 3, 3), _weights(1, 1, 1, 2)]
    layer = net.layers.add()
    layer.name, layer.type = "conv1", schema.message_class("V1LayerParameter").CONVOLUTION
    layer.bottom.append("data")
    layer.top.append("conv1")
    layer.blobs_lr.extend([1, 2])
    for array in arrays:
        _fill(layer.blobs.add(), array, legacy=True)
    relu = net.layers.add()
    relu.name, relu.type = "relu1", schema.message_class("V1LayerParameter").RELU
    return net, arrays


def test_v1_layers(tmp_path, schema):
    net, arrays = _v1_net(schema)
    model, written = _round_trip(tmp_path, schema, net.SerializeToString())
    assert written == net.SerializeToString()
    assert model.layer_field == "layers" and not model.v0
    assert [len(blobs) for blobs in model.blobs] == [2, 0]
    for blob, array in zip(model.layer_blobs()["conv1"], arrays):
        assert blob.shape == array.shape and blob.legacy_dims
        np.testing.assert_array_equal(blob.data, array)


def test_v0_layers_nest_their_blobs(tmp_path, schema):
    net = schema.new("NetParameter")
    net.name = "ancient"
    weights = _weights(4, 1, 1, 6)
    for name, kind in (("ip", "innerproduct"), ("relu", "relu")):
        inner = net.layers.add().layer
        inner.name, inner.type = name, kind
    net.layers[0].layer.num_output = 4
    net.layers[0].bottom.append("data")
    _fill(net.layers[0].layer.blobs.add(), weights, legacy=True)
    model, written = _round_trip(tmp_path, schema, net.SerializeToString())
    assert written == net.SerializeToString()
    assert model.v0 and not len(model.net.layers[0].layer.blobs)
    assert list(model.layer_blobs()) == ["ip", "relu"]
    np.testing.assert_array_equal(model.layer_blobs()["ip"][0].data, weights)


def test_unknown_fields_stay_after_the_blobs(tmp_path, schema):
    """C++ writes unknown fields last; so must the splice, for byte identity."""
    net, _ = _current_net(schema)
    unknown = _key(9999, 0) + wirecodec.varint_bytes(3)
    layer = net.layer[1].SerializeToString() + unknown
    data = b"".join(
        _bytes_field(100, layer) if i == 1 else _bytes_field(100, l.SerializeToString())
        for i, l in enumerate(net.layer)
    )
    data = _bytes_field(1, net.name.encode()) + data
    model, written = _round_trip(tmp_path, schema, data)
    assert written == data
    assert len(model.blobs[1]) == 2


def test_solverstate(tmp_path, schema):
    state = schema.new("SolverState")
    state.iter, state.learned_net, state.current_step = 1200, "snap_iter_1200.caffemodel", 2
    history = [_weights(4, 3), _weights(4)]
    for array in history:
        _fill(state.history.add(), array)
    loaded = load_solverstate(_write(tmp_path, "s.solverstate", state.SerializeToString()), schema)
    assert (loaded.state.iter, loaded.state.learned_net, loaded.state.current_step) == (1200, state.learned_net, 2)
    assert not len(loaded.state.history)
    for blob, array in zip(loaded.history, history):
        np.testing.assert_array_equal(blob.data, array)


@pytest.mark.parametrize("legacy", [False, True])
def test_binaryproto_round_trip(tmp_path, schema, legacy):
    mean = _weights(1, 3, 5, 4)
    data = _fill(schema.new("BlobProto"), mean, legacy=legacy).SerializeToString()
    path = _write(tmp_path, "mean.binaryproto", data)
    blob = load_blob(path, schema)
    np.testing.assert_array_equal(blob.data, mean)
    save_blob(blob, str(tmp_path / "again.binaryproto"))
    assert (tmp_path / "again.binaryproto").read_bytes() == data


# ------------------------------------------------------------------- errors --


def test_schema_with_moved_blob_fields_is_refused(tmp_path, schema):
    text = open(schema.path, encoding="utf-8").read()
    assert "repeated float data = 5 [packed = true];" in text
    moved = tmp_path / "fork.proto"
    moved.write_text(text.replace("repeated float data = 5 [packed = true];", "repeated float data = 15;"))
    net, _ = _current_net(schema)
    with pytest.raises(CaffeFtError, match=r"BlobProto\.data is not field 5"):
        load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), load_schema(str(moved)))


def _top_level_ends(net):
    """Byte offsets where a NetParameter prefix of whole fields ends."""
    partial = type(net)()
    partial.name = net.name
    ends = [len(partial.SerializeToString())]
    for layer in net.layer:
        partial.layer.add().CopyFrom(layer)
        ends.append(len(partial.SerializeToString()))
    return ends


def test_every_truncation_is_an_error(tmp_path, schema):
    net, _ = _current_net(schema)
    data = net.SerializeToString()
    layer_ends = set(_top_level_ends(net)[1:])  # cut there, the file is a smaller valid net
    for cut in range(1, len(data)):
        if cut in layer_ends:
            continue
        path = _write(tmp_path, "cut.caffemodel", data[:cut])
        with pytest.raises(CaffeFtError) as info:
            load_model(path, schema)
        assert path in str(info.value)
    middle = _write(tmp_path, "mid.caffemodel", data[: len(data) - 10])
    with pytest.raises(CaffeFtError, match="truncated"):
        load_model(middle, schema)


def test_random_bytes(tmp_path, schema):
    rng = np.random.default_rng(1)
    for size in (1, 3, 100, 5000):
        path = _write(tmp_path, "noise.caffemodel", rng.integers(0, 256, size, np.uint8).tobytes())
        for load in (load_model, load_blob, load_solverstate):
            with pytest.raises(CaffeFtError, match="noise.caffemodel"):
                load(path, schema)


@pytest.mark.parametrize("load", [load_model, load_blob, load_solverstate])
def test_text_prototxt_is_named(tmp_path, schema, load):
    text = b'name: "LeNet"\nlayer {\n  name: "data"\n  type: "Input"\n}\n'
    with pytest.raises(CaffeFtError, match="text file"):
        load(_write(tmp_path, "net.prototxt", text), schema)


def test_empty_missing_and_hdf5_files(tmp_path, schema):
    with pytest.raises(CaffeFtError, match="empty"):
        load_model(_write(tmp_path, "empty.caffemodel", b""), schema)
    with pytest.raises(CaffeFtError, match="cannot read"):
        load_model(str(tmp_path / "missing.caffemodel"), schema)
    with pytest.raises(CaffeFtError, match="cannot read"):
        load_model(str(tmp_path), schema)
    with pytest.raises(CaffeFtError, match="HDF5"):
        load_model(_write(tmp_path, "w.caffemodel.h5", b"\x89HDF\r\n\x1a\n" + bytes(100)), schema)


def test_net_without_layers_is_not_a_caffemodel(tmp_path, schema):
    net = schema.new("NetParameter")
    net.name = "\x01\x02"  # not text, so the "no layers" reason shows
    with pytest.raises(CaffeFtError, match="no layers"):
        load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)


def test_blob_values_must_match_its_shape(tmp_path, schema):
    net = schema.new("NetParameter")
    layer = net.layer.add()
    layer.name = "fc"
    blob = layer.blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1, 2, 3])
    with pytest.raises(CaffeFtError, match=r"layer 0 'fc', blob 0: .*holds 6 values but its data has 3"):
        load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)


def test_save_checks_the_model(tmp_path, schema):
    net, _ = _current_net(schema)
    model = load_model(_write(tmp_path, "m.caffemodel", net.SerializeToString()), schema)
    out = str(tmp_path / "out.caffemodel")
    model.blobs[1][0] = Blob((3,), np.zeros(3, np.int32))
    with pytest.raises(CaffeFtError, match="floating-point"):
        save_model(model, out)
    model.blobs[1][0] = Blob((2, 2), np.zeros(3, np.float32))
    with pytest.raises(CaffeFtError, match="holds 4"):
        save_model(model, out)
    model.blobs.pop()
    with pytest.raises(CaffeFtError, match="blobs for 3 layers"):
        save_model(model, out)
    assert not os.path.exists(out)


def test_failed_write_leaves_nothing_behind(tmp_path, schema, monkeypatch):
    net, _ = _current_net(schema)
    data = net.SerializeToString()
    path = _write(tmp_path, "m.caffemodel", data)
    model = load_model(path, schema)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(caffemodel, "_write_array", disk_full)
    monkeypatch.setattr(caffemodel, "_kernel_copy", disk_full)  # the blobs are copied file to file
    with pytest.raises(CaffeFtError, match="No space left"):
        save_model(model, path)
    assert os.listdir(tmp_path) == ["m.caffemodel"]
    assert open(path, "rb").read() == data
    with pytest.raises(CaffeFtError, match="cannot write"):
        save_model(model, str(tmp_path / "no-such-dir" / "m.caffemodel"))


# ------------------------------------------------------------ real Caffe --

SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture(scope="module")
def caffe():
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe as pycaffe

    pycaffe.set_mode_cpu()
    return pycaffe


def _assert_same_params(model, net):
    ours = {name: blobs for name, blobs in model.layer_blobs().items() if blobs}
    assert list(ours) == list(net.params)
    for name, params in net.params.items():
        assert [blob.shape for blob in ours[name]] == [tuple(p.data.shape) for p in params]
        for blob, param in zip(ours[name], params):
            np.testing.assert_array_equal(blob.data, param.data)


@pytest.mark.caffe
def test_pycaffe_saved_model(tmp_path, schema, caffe):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL_NET)
    net = caffe.Net(str(proto), caffe.TEST)
    for params in net.params.values():
        for param in params:
            param.data[...] = RNG.standard_normal(param.data.shape)
    saved = str(tmp_path / "small.caffemodel")
    net.save(saved)
    model = load_model(saved, schema)
    _assert_same_params(model, net)
    ours = str(tmp_path / "ours.caffemodel")
    save_model(model, ours)
    assert open(ours, "rb").read() == open(saved, "rb").read()


@pytest.mark.caffe
def test_pycaffe_loads_what_we_modified(tmp_path, schema, caffe):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL_NET)
    net = caffe.Net(str(proto), caffe.TEST)
    saved = str(tmp_path / "small.caffemodel")
    net.save(saved)
    model = load_model(saved, schema)
    fc = model.layer_blobs()["fc"]
    fc[0] = Blob.of(_weights(*fc[0].shape))
    fc[1] = Blob.of(np.arange(5, dtype=np.float32))
    changed = str(tmp_path / "changed.caffemodel")
    save_model(model, changed)
    reloaded = caffe.Net(str(proto), changed, caffe.TEST)
    np.testing.assert_array_equal(reloaded.params["fc"][0].data, fc[0].data)
    np.testing.assert_array_equal(reloaded.params["fc"][1].data, np.arange(5))
    np.testing.assert_array_equal(reloaded.params["conv1"][0].data, net.params["conv1"][0].data)


def _nsfw_files():
    weights = glob.glob(os.path.join(NSFW_DIR, "*.caffemodel"))
    assert weights, f"no caffemodel in {NSFW_DIR}"
    return os.path.join(NSFW_DIR, "deploy.prototxt"), weights[0]


@pytest.mark.caffe
def test_nsfw_model_matches_pycaffe(tmp_path, schema, caffe):
    deploy, weights = _nsfw_files()
    model = load_model(weights, schema)
    net = caffe.Net(deploy, weights, caffe.TEST)
    _assert_same_params(model, net)
    assert model.param_count == sum(p.data.size for params in net.params.values() for p in params)
    out = str(tmp_path / "nsfw.caffemodel")
    save_model(model, out)
    assert open(out, "rb").read() == open(weights, "rb").read()


@pytest.mark.parametrize("path_taken", ["kernel copy", "buffered copy", "from memory"])
def test_blobs_named_finite_are_checked_on_every_write_path(tmp_path, schema, monkeypatch, path_taken):
    """save_model(finite=...) refuses a NaN in a named blob whichever way its
    bytes go out (file to file at the same page offset, through the buffer at
    another one, or from memory), leaving no file; other blobs are not checked."""
    net, _ = _current_net(schema)
    net.layer[3].blobs[0].data[-1] = float("nan")
    path = _write(tmp_path, "m.caffemodel", net.SerializeToString())
    model = load_model(path, schema)
    if path_taken == "buffered copy":
        model.net.name = "a longer name shifts every blob by a few bytes"
        monkeypatch.setattr(caffemodel, "_COPY_BUFFER", 16)
    elif path_taken == "from memory":
        model = _copied(model)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(caffemodel.NotFinite) as refused:
        save_model(model, str(out / "o.caffemodel"), finite={(1, 0), (3, 0)})
    assert (refused.value.layer_index, refused.value.blob_index) == (3, 0)
    assert os.listdir(out) == []
    save_model(model, str(out / "o.caffemodel"), finite={(1, 0), (1, 1), (3, 1)})  # the NaN's blob not named
    save_model(_copied(model), str(tmp_path / "encoded.caffemodel"))
    assert (out / "o.caffemodel").read_bytes() == (tmp_path / "encoded.caffemodel").read_bytes()


@pytest.mark.parametrize("shift", [False, True])
def test_copies_hand_their_bytes_to_the_disk_as_they_go(tmp_path, schema, monkeypatch, shift):
    """Both copies start the writeback of every range they copy (so that the
    final fsync does not wait for all of it), and a kernel that refuses it
    changes nothing in what is written."""
    path, data = _mixed_model_file(tmp_path, schema)
    model = load_model(path, schema)
    if shift:
        model.net.name = "a longer name shifts every blob by a few bytes"
    monkeypatch.setattr(caffemodel, "_FLUSH_EVERY", 24)
    monkeypatch.setattr(caffemodel, "_COPY_BUFFER", 16)
    started = []

    def refuse(fd, offset, count, flags):
        started.append((offset, count, flags))
        return -1  # as libc refuses: errno set, nothing done

    monkeypatch.setattr(caffemodel, "_sync_file_range", lambda: refuse)
    save_model(model, str(tmp_path / "out.caffemodel"))
    monkeypatch.undo()
    assert caffemodel._sync_file_range() is not None  # Linux's libc has it: the real call runs below
    save_model(model, str(tmp_path / "real.caffemodel"))
    save_model(_copied(model), str(tmp_path / "encoded.caffemodel"))
    written = (tmp_path / "out.caffemodel").read_bytes()
    assert written == (tmp_path / "encoded.caffemodel").read_bytes() == (tmp_path / "real.caffemodel").read_bytes()
    arrays = [a for blobs in model.blobs for blob in blobs for a in (blob.data, blob.diff) if a is not None]
    assert sum(count for _, count, _ in started) == sum(a.nbytes for a in arrays)
    assert all(flags == caffemodel._SYNC_FILE_RANGE_WRITE and 0 < count < 24 + 16 for _, count, flags in started)
    for offset, count, _ in started:  # each range is a run of some array's bytes in the output
        assert any(written[offset:offset + count] in a.astype(a.dtype.newbyteorder("<")).tobytes()
                   for a in arrays)
