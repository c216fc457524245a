"""caffe_ft.heads.cache: the cut trunk, Caffe's TEST-phase data transform,
data sources, fingerprints and the feature cache (``caffe-ft features``)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from caffe_ft.data.sources import DataSource, image_path, read_image_list

from caffe_ft.data.transform import (
    Transform,
    decode_datum,
    default_transform,
    mean_array,
    net_data_layer,
    net_root_folder,
    override,
    read_image,
    transform_image,
)

from caffe_ft.formats.files import load_net, sha256_file

from caffe_ft.heads.cache import (
    FORMAT,
    FeatureSet,
    Request,
    compute_or_reuse,
    load_features,
    save_features,
    stale_parts,
)

from caffe_ft.heads.trunk import cut_net

from caffe_ft.training.pycaffe import quiet_caffe
from caffe_ft.errors import CaffeFtError

import feature_nets  # noqa: E402
from conftest import NSFW_DIR, cli_runner  # noqa: E402
from ft_nets import CAFFENET  # noqa: E402

# --------------------------------------------------------------------------
# The transform (numpy only)


def test_transform_crops_centre_then_subtracts_mean_then_scales(schema):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 7, 6)).astype(np.uint8)
    transform = Transform(crop_size=4, mean_values=(10.0, 20.0, 30.0), scale=0.5)
    out = transform_image(image, transform, mean_array(transform, schema))
    # centre offsets: (7 - 4) // 2 = 1 rows, (6 - 4) // 2 = 1 columns
    expected = (image[:, 1:5, 1:5].astype(np.float32) - np.float32([10, 20, 30])[:, None, None]) * np.float32(0.5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_mean_file_is_indexed_at_the_uncropped_position():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 6, 6)).astype(np.uint8)
    mean = rng.uniform(0, 255, (3, 6, 6)).astype(np.float32)
    out = transform_image(image, Transform(crop_size=2, scale=2.0), mean)
    expected = (image.astype(np.float32) - mean)[:, 2:4, 2:4] * np.float32(2.0)
    np.testing.assert_array_equal(out, expected)


def test_mean_file_of_another_size_is_refused():
    image = np.zeros((3, 6, 6), np.uint8)
    with pytest.raises(CaffeFtError, match="must match"):
        transform_image(image, Transform(), np.zeros((3, 5, 5), np.float32))


def test_one_mean_value_applies_to_every_channel_and_a_wrong_count_is_refused(schema):
    image = np.full((3, 2, 2), 50, np.uint8)
    one = Transform(mean_values=(20.0,))
    assert (transform_image(image, one, mean_array(one, schema)) == 30).all()
    two = Transform(mean_values=(1.0, 2.0))
    with pytest.raises(CaffeFtError, match="2 mean values for 3-channel"):
        transform_image(image, two, mean_array(two, schema))


def test_crop_larger_than_the_image_is_refused():
    with pytest.raises(CaffeFtError, match="smaller than crop_size"):
        transform_image(np.zeros((1, 4, 8), np.uint8), Transform(crop_size=5), None)


@pytest.mark.parametrize("settings, message", [
    ({"mean_file": "m.binaryproto", "mean_values": (1.0,)}, "not both"),
    ({"new_height": 10}, "both a new height and a new width"),
    ({"force_color": True, "force_gray": True}, "exclude"),
])
def test_inconsistent_transforms_are_refused(settings, message):
    with pytest.raises(CaffeFtError, match=message):
        Transform(**settings)


def test_the_test_phase_data_layer_gives_the_transform(parse_net):
    net = parse_net(feature_nets.train_val("train.txt", "val.txt", root_folder="/imgs/"))
    transform = default_transform(net)
    assert transform.crop_size == feature_nets.CROP
    assert transform.mean_values == feature_nets.MEAN
    assert transform.scale == pytest.approx(feature_nets.SCALE)
    assert (transform.new_height, transform.new_width) == (feature_nets.RESIZE, feature_nets.RESIZE)
    assert net_data_layer(net).include[0].phase == 1  # TEST's, not TRAIN's (which mirrors)
    assert net_root_folder(net) == "/imgs/"


def test_a_deploy_net_resizes_to_its_input(parse_net):
    transform = default_transform(parse_net(feature_nets.deploy()))
    assert transform == Transform(new_height=feature_nets.CROP, new_width=feature_nets.CROP)


def test_a_one_channel_deploy_net_reads_grey_images(parse_net):
    net = parse_net('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 16 '
                    'dim: 12 } } }')
    assert default_transform(net) == Transform(new_height=16, new_width=12, is_color=False)


def test_override_replaces_the_mean_kind():
    base = Transform(mean_file="mean.binaryproto", crop_size=3)
    changed = override(base, mean_values=(1.0, 2.0, 3.0), crop_size=None, scale=0.5)
    assert changed == Transform(mean_values=(1.0, 2.0, 3.0), crop_size=3, scale=0.5)
    assert override(changed, mean_file="other.binaryproto").mean_values == ()


# --------------------------------------------------------------------------
# Data sources


def test_image_list_lines_split_at_the_last_space(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a b.png 3\n c.png 0\n")  # as Caffe splits them (more in tests/test_sources.py)
    assert read_image_list(str(listing)) == [("a b.png", 3), (" c.png", 0)]


@pytest.mark.parametrize("content", ["a.png x\n", "a.png\n", " 3\n"])
def test_a_bad_image_list_line_is_located(tmp_path, content):
    listing = tmp_path / "list.txt"
    listing.write_text("ok.png 1\n" + content)
    with pytest.raises(CaffeFtError) as info:
        read_image_list(str(listing))
    assert info.value.line == 2


def test_root_folder_prefixes_paths():
    assert image_path("", "a/b.png") == "a/b.png"
    assert image_path("/data/", "b.png") == "/data/b.png"
    assert image_path("/data", "b.png") == "/data/b.png"


def test_raw_datums_decode_without_opencv(schema):
    datum = schema.new("Datum")
    datum.channels, datum.height, datum.width, datum.label = 2, 3, 4, 7
    values = np.arange(24, dtype=np.uint8)
    datum.data = values.tobytes()
    image, label = decode_datum(datum.SerializeToString(), schema, Transform())
    assert label == 7
    np.testing.assert_array_equal(image, values.reshape(2, 3, 4))
    floats = schema.new("Datum")
    floats.channels, floats.height, floats.width = 1, 2, 2
    floats.float_data.extend([0.5, 1.5, 2.5, 3.5])
    image, _ = decode_datum(floats.SerializeToString(), schema, Transform())
    assert image.dtype == np.float32 and image[0, 1, 1] == 3.5
    floats.ClearField("float_data")
    with pytest.raises(CaffeFtError, match="holds 0 values"):
        decode_datum(floats.SerializeToString(), schema, Transform())


def test_an_lmdb_without_the_lmdb_module_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "data.mdb").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "lmdb", None)
    source = DataSource.open(str(tmp_path))
    with pytest.raises(CaffeFtError, match="python3-lmdb"):
        len(source)


class _FakeLmdb:
    """Just enough of the ``lmdb`` module's API to read records in key order."""

    def __init__(self, records):
        self.records = records

    def open(self, path, **options):
        assert options["readonly"]
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def stat(self):
        return {"entries": len(self.records)}

    def begin(self):
        return self

    def cursor(self):
        return iter(sorted(self.records.items()))


def _datum(schema, label, fill):
    datum = schema.new("Datum")
    datum.channels, datum.height, datum.width, datum.label = 3, 4, 4, label
    datum.data = bytes([fill]) * 48
    return datum.SerializeToString()


def test_lmdb_records_are_read_in_key_order_and_transformed(tmp_path, monkeypatch, schema):
    (tmp_path / "data.mdb").write_bytes(b"")
    records = {b"00000002": _datum(schema, 2, 30), b"00000000": _datum(schema, 0, 10), b"00000001": _datum(schema, 1, 20)}
    monkeypatch.setitem(sys.modules, "lmdb", _FakeLmdb(records))
    source = DataSource.open(str(tmp_path))
    assert source.is_lmdb and len(source) == 3
    transform = Transform(crop_size=2, mean_values=(5.0,), scale=0.5)
    batches = list(source.batches(schema, transform, mean_array(transform, schema), 2))
    assert [names for _, _, names in batches] == [["00000000", "00000001"], ["00000002"]]
    assert batches[0][0].shape == (2, 3, 2, 2) and batches[0][1].tolist() == [0, 1]
    assert (batches[0][0][1] == (20 - 5) * 0.5).all()
    limited = DataSource(str(tmp_path), limit=2)
    assert len(limited) == 2 and len(list(limited.items(schema, transform))) == 2
    records[b"00000003"] = b"\xff\xff not a datum"
    with pytest.raises(CaffeFtError, match="record '00000003'"):
        list(source.items(schema, transform))


def test_a_directory_that_is_no_lmdb_is_refused(tmp_path):
    with pytest.raises(CaffeFtError, match="no data.mdb"):
        DataSource.open(str(tmp_path))


# --------------------------------------------------------------------------
# Fingerprints


def _list_of_files(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    return str(listing)


def test_data_fingerprint_follows_the_list_and_the_images(tmp_path):
    listing = _list_of_files(tmp_path, ["a.png", "b.png"])
    first = DataSource.open(listing, str(tmp_path)).fingerprint()
    assert DataSource.open(listing, str(tmp_path)).fingerprint() == first
    (tmp_path / "b.png").write_bytes(b"a longer, different image")
    changed_image = DataSource.open(listing, str(tmp_path)).fingerprint()
    assert changed_image != first
    with open(listing, "a") as handle:
        handle.write("a.png 5\n")
    assert DataSource.open(listing, str(tmp_path)).fingerprint() not in (first, changed_image)


def test_a_missing_image_is_named(tmp_path):
    listing = _list_of_files(tmp_path, ["a.png"])
    with open(listing, "a") as handle:
        handle.write("gone.png 1\n")
    with pytest.raises(CaffeFtError, match="gone.png"):
        DataSource.open(listing, str(tmp_path)).fingerprint()


def test_stale_parts_names_what_differs():
    assert stale_parts({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) == []
    assert stale_parts({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]


def test_sha256_file_reads_the_whole_file(tmp_path):
    import hashlib

    data = os.urandom(3 << 20)
    path = tmp_path / "w.caffemodel"
    path.write_bytes(data)
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_transform_fingerprint_follows_settings_and_mean_file_content(tmp_path, schema):
    from caffe_ft.formats.caffemodel import Blob, save_blob

    mean = tmp_path / "mean.binaryproto"
    save_blob(Blob.of(np.zeros((1, 3, 4, 4), np.float32)), str(mean))
    with_file = Transform(mean_file=str(mean))
    before = with_file.fingerprint()
    assert Transform(mean_file=str(mean), scale=0.5).fingerprint() != before
    save_blob(Blob.of(np.ones((1, 3, 4, 4), np.float32)), str(mean))
    assert with_file.fingerprint() != before
    assert mean_array(with_file, schema).shape == (3, 4, 4)


def test_features_file_round_trip_and_foreign_files(tmp_path):
    path = str(tmp_path / "f.npz")
    meta = {"format": FORMAT, "fingerprints": {"trunk": "x"}}
    written = FeatureSet(np.arange(12, dtype=np.float32).reshape(3, 2, 2, 1), np.array([0, 1, 0]),
                            np.array(["a", "b", "c"]), meta)
    save_features(path, written)
    read = load_features(path)
    np.testing.assert_array_equal(read.features, written.features)
    np.testing.assert_array_equal(read.labels, written.labels)
    assert list(read.sources) == ["a", "b", "c"] and read.meta == meta
    assert read.matrix.shape == (3, 4) and read.matrix[1].tolist() == [4, 5, 6, 7]
    np.savez(str(tmp_path / "other.npz"), x=np.zeros(2))
    with pytest.raises(CaffeFtError, match="not a caffe-ft features file"):
        load_features(str(tmp_path / "other.npz"))


# --------------------------------------------------------------------------
# Cutting the net


def test_default_cut_keeps_what_the_head_reads(parse_net, schema):
    trunk = cut_net(parse_net(CAFFENET), schema, (3, 32, 32), batch=5)
    names = [layer.name for layer in trunk.net.layer]
    # fc7 as the head sees it: after relu7 and drop7, which rewrite it in place
    assert names == ["data", "conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "fc6", "relu6", "drop6",
                     "fc7", "relu7", "drop7"]
    assert (trunk.input_blob, trunk.feature_blob, trunk.layer) == ("data", "fc7", "drop7")
    assert trunk.net.layer[0].type == "Input"
    assert list(trunk.net.layer[0].input_param.shape[0].dim) == [5, 3, 32, 32]
    assert not any(len(layer.include) for layer in trunk.net.layer)


@pytest.mark.parametrize("layer, last, blob", [
    ("conv2", "relu2", "conv2"),  # a layer: its output after the in-place layers that follow
    ("pool1", "pool1", "pool1"),
    ("fc6", "drop6", "fc6"),
    ("conv1", "relu1", "conv1"),
])
def test_cut_at_a_layer_or_blob(parse_net, schema, layer, last, blob):
    trunk = cut_net(parse_net(CAFFENET), schema, (3, 32, 32), layer)
    assert trunk.net.layer[-1].name == last and trunk.feature_blob == blob


def test_cut_at_an_unknown_layer_suggests_names(parse_net, schema):
    with pytest.raises(CaffeFtError, match="did you mean 'conv2'"):
        cut_net(parse_net(CAFFENET), schema, (3, 32, 32), "conv3")


def test_trunk_fingerprint_ignores_batch_and_head_but_not_trunk_layers(parse_net, schema):
    net = parse_net(CAFFENET)
    base = cut_net(net, schema, (3, 32, 32), batch=1).fingerprint()
    assert cut_net(net, schema, (3, 32, 32), batch=64).fingerprint() == base
    net.layer[[layer.name for layer in net.layer].index("fc8")].inner_product_param.num_output = 5
    assert cut_net(net, schema, (3, 32, 32)).fingerprint() == base
    net.layer[[layer.name for layer in net.layer].index("conv1")].convolution_param.num_output = 4
    assert cut_net(net, schema, (3, 32, 32)).fingerprint() != base
    assert cut_net(parse_net(CAFFENET), schema, (3, 28, 28)).fingerprint() != base


def test_a_trunk_reading_labels_is_refused(parse_net, schema):
    net = parse_net(CAFFENET.replace('bottom: "norm1" top: "conv2"', 'bottom: "norm1" bottom: "label" top: "conv2"'))
    with pytest.raises(CaffeFtError, match="labels"):
        cut_net(net, schema, (3, 32, 32))


# --------------------------------------------------------------------------
# With Caffe


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Images, lists, the small train_val net and two sets of random weights."""
    from synth_images import write_dataset

    root = tmp_path_factory.mktemp("small")
    train = write_dataset(str(root / "train"), "photo", 8, classes=3, size=40, seed=3)
    val = write_dataset(str(root / "val"), "photo", 4, classes=3, size=44, seed=4)
    net = root / "train_val.prototxt"
    net.write_text(feature_nets.train_val(train, val, batch_size=5))
    return {"root": root, "train": train, "val": val, "net": str(net),
            "weights": feature_nets.make_weights(str(root), 1), "other_weights": feature_nets.make_weights(str(root), 2)}


def _caffe_batches(net_path: str, count: int, blobs):
    """Blobs of Caffe's own TEST net, forwarded until ``count`` examples are seen."""
    caffe = quiet_caffe()
    net = caffe.Net(net_path, caffe.TEST)
    out = {name: [] for name in blobs}
    seen = 0
    while seen < count:
        net.forward()
        for name in blobs:
            out[name].append(net.blobs[name].data.copy())
        seen += net.blobs["data"].num
    return {name: np.concatenate(parts)[:count] for name, parts in out.items()}


@pytest.mark.caffe
def test_transform_matches_caffes_image_data_layer(small, schema):
    """Caffe's own ImageData (TEST): resize, BGR, centre crop, mean, scale."""
    entries = read_image_list(small["val"])
    expected = _caffe_batches(small["net"], len(entries), ["data", "label"])
    net = load_net(small["net"], schema)
    transform = default_transform(net)
    ours = np.stack([transform_image(read_image(path, transform), transform, mean_array(transform, schema))
                     for path, _ in entries])
    assert ours.shape == expected["data"].shape
    np.testing.assert_array_equal(ours, expected["data"])
    np.testing.assert_array_equal(expected["label"], [label for _, label in entries])


@pytest.mark.caffe
def test_transform_with_mean_file_and_grey_matches_caffe(small, schema, tmp_path):
    from caffe_ft.formats.caffemodel import Blob, save_blob

    mean = tmp_path / "mean.binaryproto"
    rng = np.random.default_rng(5)
    save_blob(Blob.of(rng.uniform(0, 255, (1, 1, 44, 44)).astype(np.float32)), str(mean))
    text = (feature_nets.train_val(small["train"], small["val"], batch_size=4)
            .replace("new_height: 36 new_width: 36", "is_color: false")
            .replace("mean_value: 104 mean_value: 117 mean_value: 123", f'mean_file: "{mean}"'))
    path = tmp_path / "grey.prototxt"
    path.write_text(text)
    entries = read_image_list(small["val"])
    expected = _caffe_batches(str(path), len(entries), ["data"])["data"]
    transform = default_transform(load_net(str(path), schema))
    assert transform.is_color is False and transform.mean_file == str(mean)
    mean = mean_array(transform, schema)
    ours = np.stack([transform_image(read_image(p, transform), transform, mean) for p, _ in entries])
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.caffe
def test_features_equal_the_full_nets_blob(small, schema, tmp_path):
    output = str(tmp_path / "f.npz")
    outcome = compute_or_reuse(Request(small["net"], small["weights"], small["val"], batch_size=5), output, schema)
    assert not outcome.reused
    result = load_features(output)
    assert result.meta["blob"] == "fc1" and result.meta["layer"] == "drop1"
    assert result.features.shape == (12, 32)
    entries = read_image_list(small["val"])
    assert list(result.sources) == [path for path, _ in entries]
    np.testing.assert_array_equal(result.labels, [label for _, label in entries])
    # the whole train_val net, run by Caffe from its own data layer, with the same weights
    caffe = quiet_caffe()
    net = caffe.Net(small["net"], small["weights"], caffe.TEST)
    seen = []
    while sum(len(part) for part in seen) < 12:
        net.forward()
        seen.append(net.blobs["fc1"].data.copy())
    np.testing.assert_allclose(result.features, np.concatenate(seen)[:12], rtol=1e-5, atol=1e-6)


@pytest.mark.caffe
def test_cache_is_reused_and_stale_caches_are_recomputed(small, schema, tmp_path):
    output = str(tmp_path / "f.npz")
    request = Request(small["net"], small["weights"], small["train"], batch_size=7)
    first = compute_or_reuse(request, output, schema)
    assert not first.reused and first.reason == "no features file yet"
    again = compute_or_reuse(request, output, schema)
    assert again.reused and again.reason == "up to date"
    np.testing.assert_array_equal(again.features.features, first.features.features)

    other_weights = compute_or_reuse(Request(small["net"], small["other_weights"], small["train"]), output, schema)
    assert not other_weights.reused and other_weights.reason == "stale: weights changed"
    assert not np.allclose(other_weights.features.features, first.features.features)

    changed = tmp_path / "changed.prototxt"
    changed.write_text(open(small["net"]).read().replace("pool: AVE kernel_size: 4 stride: 4",
                                                          "pool: MAX kernel_size: 4 stride: 4"))
    other_net = compute_or_reuse(Request(str(changed), small["other_weights"], small["train"]), output, schema)
    assert not other_net.reused and other_net.reason == "stale: trunk changed"

    other_data = compute_or_reuse(Request(str(changed), small["other_weights"], small["val"]), output, schema)
    assert other_data.reason == "stale: data changed" and len(other_data.features.labels) == 12

    other_layer = compute_or_reuse(Request(str(changed), small["other_weights"], small["val"], "pool2"),
                                      output, schema)
    assert other_layer.reason == "stale: layer changed, trunk changed"
    assert other_layer.features.features.shape == (12, 16, 4, 4)

    other_transform = compute_or_reuse(
        Request(str(changed), small["other_weights"], small["val"], "pool2", transform={"scale": 0.01}), output, schema)
    assert other_transform.reason == "stale: transform changed"
    assert compute_or_reuse(Request(str(changed), small["other_weights"], small["val"], "pool2",
                                          transform={"scale": 0.01}), output, schema).reused


@pytest.mark.caffe
def test_features_command_reports_reuse(small, tmp_path):
    from caffe_ft.cli import main

    output = str(tmp_path / "f.npz")
    args = ["features", small["net"], "--weights", small["weights"], "--data", small["val"], "-o", output,
            "--batch-size", "4"]
    runner = cli_runner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output + first.stderr
    assert "computed (no features file yet): 12 examples, feature 'fc1' 32" in first.stdout
    assert "features fc1: 12/12 images" in first.stderr  # plain progress lines off a terminal
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and "reused: 12 examples" in second.stdout
    forced = runner.invoke(main, args + ["--force"])
    assert "computed (forced)" in forced.stdout
    bad = runner.invoke(main, args[:-2] + ["--layer", "nope"])
    assert bad.exit_code == 2 and "no layer named 'nope'" in bad.stderr


@pytest.mark.caffe
def test_nsfw_features_are_the_pooled_output(tmp_path, schema):
    from synth_images import write_dataset

    listing = write_dataset(str(tmp_path / "img"), "photo", 2, classes=2, size=256, seed=7)
    request = Request(os.path.join(NSFW_DIR, "deploy.prototxt"),
                         os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel"), listing, batch_size=4,
                         transform={"new_height": 256, "new_width": 256, "crop_size": 224,
                                    "mean_values": (104.0, 117.0, 123.0)})
    result = compute_or_reuse(request, str(tmp_path / "f.npz"), schema).features
    assert result.meta["blob"] == "pool" and result.features.shape == (4, 1024, 1, 1)
    assert result.meta["input_shape"] == [3, 224, 224]
    assert (result.features >= 0).all() and result.features.std() > 0


def test_heavy_modules_load_only_when_used():
    """`caffe-ft --help` and the other commands stay fast: no numpy, scikit-learn, OpenCV or pycaffe on import."""
    import subprocess

    code = ("import sys, caffe_ft.cli, caffe_ft.heads.cache, caffe_ft.heads.linear, caffe_ft.recipe.advise; "
            "print(sorted(m for m in ('numpy', 'sklearn', 'cv2', 'caffe') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
