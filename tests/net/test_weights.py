"""Weights before GPU time: ``check`` predicts Caffe's CopyTrainedLayersFrom, ``init`` writes the start.

Host tests build small caffemodels with our own writer (``save_model``) and
read them back as any caffemodel is read.  Tests marked ``caffe`` hold the
predictions against real pycaffe (``Net.copy_from``, including its aborts, run
in a child process) and load init-written files in pycaffe and OpenCV.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from caffe_ft.net import weights
from caffe_ft.formats.caffemodel import Blob, Model, load_model, save_model
from caffe_ft.cli import main
from caffe_ft.errors import CaffeFtError
from caffe_ft.net.weights import COPIED, FRESH, MISMATCH
from conftest import NSFW_DIR, cli_runner

RNG = np.random.default_rng(11)
LEGACY = ("num", "channels", "height", "width")

# conv1 on a 3x8x8 input gives 4x6x6 = 144 inputs to fc.
NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.01 }
                              bias_filler { type: "constant" value: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def array(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def legacy_blob(values: np.ndarray) -> Blob:
    """A blob stored the pre-2015 way: num/channels/height/width, no BlobShape."""
    return Blob(tuple(values.shape), values, legacy_dims=LEGACY, shape_field=False)


def source_arrays() -> dict:
    return {"conv1": [array(4, 3, 3, 3), array(4)], "fc": [array(10, 144), array(10)]}


@pytest.fixture
def write_model(schema, tmp_path):
    """``write_model([(name, type, [Blob | ndarray...]), ...])`` -> (path, Model read back from it)."""
    counter = iter(range(1000))

    def write(layers, name="weights"):
        net = schema.new("NetParameter")
        net.name = "pretrained"
        blobs = []
        for layer_name, kind, layer_blobs in layers:
            layer = net.layer.add()
            layer.name, layer.type = layer_name, kind
            blobs.append([b if isinstance(b, Blob) else Blob.of(b) for b in layer_blobs])
        path = str(tmp_path / f"{name}{next(counter)}.caffemodel")
        save_model(Model(net, blobs), path)
        return path, load_model(path, schema)

    return write


def pretrained(arrays=None):
    """The layers of a caffemodel trained with NET (param-free layers have no blobs)."""
    arrays = arrays or source_arrays()
    return [("data", "Input", []), ("conv1", "Convolution", arrays["conv1"]), ("relu1", "ReLU", []),
            ("fc", "InnerProduct", arrays["fc"]), ("prob", "Softmax", [])]


def rows(report):
    return {layer.name: layer for layer in report.layers}


def test_same_net_copies_every_learnable_layer(parse_net, write_model):
    arrays = source_arrays()
    _, model = write_model(pretrained(arrays))
    report = weights.check(parse_net(NET), model)
    assert report.ok and report.abort is None and not report.ignored
    assert [(r.name, r.status) for r in report.layers] == [("conv1", COPIED), ("fc", COPIED)]
    assert rows(report)["fc"].target_shapes == ((10, 144), (10,))
    out = weights.init(parse_net(NET), model)
    by_name = dict(zip((layer.name for layer in out.layers), out.blobs))
    assert [layer.name for layer in out.layers] == ["data", "conv1", "relu1", "fc", "prob"]
    for name, expected in arrays.items():
        assert [b.shape for b in by_name[name]] == [a.shape for a in expected]
        for blob, values in zip(by_name[name], expected):
            assert np.array_equal(blob.data, values)


def test_copied_blobs_stay_views_on_the_weights_file(parse_net, write_model):
    _, model = write_model(pretrained())
    out = weights.init(parse_net(NET), model)
    source = model.layer_blobs()["fc"][0].data
    copied = out.blobs[3][0].data
    assert np.shares_memory(copied, source) and not copied.flags.writeable


def test_legacy_4d_source_blobs_fit_right_aligned(parse_net, write_model, tmp_path, schema):
    arrays = source_arrays()
    legacy = {
        "conv1": [legacy_blob(arrays["conv1"][0]), legacy_blob(arrays["conv1"][1].reshape(1, 1, 1, 4))],
        "fc": [legacy_blob(arrays["fc"][0].reshape(1, 1, 10, 144)), legacy_blob(arrays["fc"][1].reshape(1, 1, 1, 10))],
    }
    _, model = write_model(pretrained(legacy))
    assert model.layer_blobs()["fc"][0].legacy_dims == LEGACY  # really stored the old way
    report = weights.check(parse_net(NET), model)
    assert report.ok and {r.status for r in report.layers} == {COPIED}
    assert rows(report)["fc"].source_shapes == ((1, 1, 10, 144), (1, 1, 1, 10))
    # init writes them as Caffe does after loading: the target's N-D shape, float32 data, no legacy fields.
    out = weights.init(parse_net(NET), model)
    path = str(tmp_path / "init.caffemodel")
    save_model(out, path)
    fc = load_model(path, schema).layer_blobs()["fc"]
    assert [(b.shape, b.legacy_dims) for b in fc] == [((10, 144), ()), ((10,), ())]
    assert np.array_equal(fc[0].data, arrays["fc"][0]) and np.array_equal(fc[1].data, arrays["fc"][1])


@pytest.mark.parametrize(
    "stored, target, fits",
    [
        ((1, 1, 10, 144), (10, 144), True),
        ((1, 1, 1, 10), (10,), True),
        ((4, 3, 3, 3), (4, 3, 3, 3), True),
        ((2, 1, 10, 144), (10, 144), False),  # num 2 is not the padding 1
        ((1, 1, 144, 10), (10, 144), False),
        ((1, 1, 1, 4), (1, 1, 1, 1, 4), False),  # legacy blobs never fit more than 4 axes
    ],
)
def test_shape_equals_legacy(stored, target, fits):
    blob = legacy_blob(np.zeros(stored, np.float32))
    assert weights.shape_equals(target, blob) is fits
    assert weights.shape_equals(stored, Blob.of(np.zeros(stored, np.float32)))
    assert not weights.shape_equals(target, Blob.of(np.zeros(stored, np.float32))) or stored == target


def test_renamed_head_is_fresh_and_filled_by_its_fillers(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET.replace('"fc"', '"fc_new"').replace("num_output: 10", "num_output: 3"))
    report = weights.check(net, model)
    head = rows(report)["fc_new"]
    assert report.ok and head.status == FRESH and head.likely_typo is None
    assert "renamed from 'fc'" in head.reason
    assert [(i.name, i.shapes) for i in report.ignored] == [("fc", ((10, 144), (10,)))]
    out = weights.init(net, model, seed=5)
    weight, bias = out.blobs[3]
    assert weight.shape == (3, 144) and np.all(bias.data == 0.5)
    assert abs(weight.data.std() - 0.01) < 0.002 and weight.data.dtype == np.float32
    text = weights.format_check(report)
    assert "FRESH" in text and "fc_new" in text and "OK: Caffe would load" in text


def test_typo_is_flagged_when_the_ignored_blobs_would_fit(parse_net, write_model):
    _, model = write_model(pretrained())
    report = weights.check(parse_net(NET.replace('name: "conv1"', 'name: "conv_1"')), model)
    row = rows(report)["conv_1"]
    assert report.ok  # Caffe starts, silently without conv1's weights
    assert row.status == FRESH and row.likely_typo == "conv1" and "LIKELY TYPO" in row.reason
    assert "LIKELY TYPO" in weights.format_check(report)
    assert report.to_dict()["layers"][0]["likely_typo"] == "conv1"


def test_a_head_renamed_by_a_rewrite_is_no_typo(parse_net, write_model, tmp_path):
    """The bare rewrite keeps fc's 10 outputs: its renamed fc_ft fits the old blobs, but is new on purpose."""
    path, model = write_model(pretrained())
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    result = cli_runner().invoke(main, ["rewrite", str(net), "--strategy", "last-fc", "--weights", path,
                                        "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "LIKELY TYPO" not in result.stderr
    assert "the new head, renamed from 'fc' so that it starts from its fillers" in result.stderr
    report = weights.check(parse_net(NET.replace('name: "conv1"', 'name: "conv_1"')), model)
    assert rows(report)["conv_1"].likely_typo == "conv1"  # `caffe-ft check` alone cannot know
    assert rows(weights.with_new_heads(report, {"conv_1": "conv1"}))["conv_1"].likely_typo is None


@pytest.mark.parametrize("renamed, typo", [
    ("conv1_ft", None), ("conv1-new", None), ("conv1/cats", None),  # deliberate: suffix after a separator
    ("conv_1", "conv1"), ("conv11", "conv1"), ("Conv1", "conv1"),  # an edit inside the name: likely a typo
])
def test_check_alone_tells_a_suffixed_rename_from_a_typo(parse_net, write_model, renamed, typo):
    _, model = write_model(pretrained())
    report = weights.check(parse_net(NET.replace('name: "conv1"', f'name: "{renamed}"')), model)
    assert rows(report)[renamed].likely_typo == typo


def test_num_output_mismatch_predicts_caffes_abort(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET.replace("num_output: 10", "num_output: 3"))
    report = weights.check(net, model)
    row = rows(report)["fc"]
    assert not report.ok and row.status == MISMATCH
    assert row.source_shapes == ((10, 144), (10,)) and row.target_shapes == ((3, 144), (3,))
    assert report.abort == (
        "Cannot copy param 0 weights from layer 'fc'; shape mismatch.  Source param shape is 10 144 (1440); "
        "target param shape is 3 144 (432). To learn this layer's parameters from scratch rather than "
        "copying from a saved net, rename the layer."
    )
    assert "num_output: 10" in row.fix and "rename" in row.fix
    with pytest.raises(CaffeFtError, match="mismatched: fc"):
        weights.init(net, model)


def test_input_change_mismatch_suggests_no_num_output(parse_net, write_model):
    _, model = write_model(pretrained())
    report = weights.check(parse_net(NET.replace("dim: 8 dim: 8", "dim: 9 dim: 9")), model)  # fc now has 196 inputs
    row = rows(report)["fc"]
    assert row.status == MISMATCH and "num_output" not in row.fix and "input differs" in row.fix
    assert "target param shape is 10 196 (1960)" in report.abort


def test_blob_count_mismatch(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET.replace("num_output: 10", "num_output: 10 bias_term: false"))
    report = weights.check(net, model)
    assert rows(report)["fc"].status == MISMATCH
    assert report.abort.endswith("(1 vs. 2) Incompatible number of blobs for layer fc")
    assert "bias_term" in rows(report)["fc"].fix


def test_param_free_layer_named_like_a_learnable_source_layer(parse_net, write_model):
    arrays = source_arrays()
    _, model = write_model(pretrained(arrays) + [("relu9", "PReLU", [array(4)])])
    net = parse_net(NET + 'layer { name: "relu9" type: "ReLU" bottom: "fc" top: "fc" }')
    report = weights.check(net, model)
    assert rows(report)["relu9"].status == MISMATCH and "(0 vs. 1)" in report.abort


def test_first_failure_in_file_order_is_the_abort(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET.replace("num_output: 4", "num_output: 5").replace("num_output: 10", "num_output: 3"))
    report = weights.check(net, model)
    assert [r.status for r in report.layers] == [MISMATCH, MISMATCH]
    assert "from layer 'conv1'" in report.abort


def test_later_source_layer_of_a_name_wins(parse_net, write_model):
    arrays, later = source_arrays(), source_arrays()
    _, model = write_model(pretrained(arrays) + [("fc", "InnerProduct", later["fc"])])
    out = weights.init(parse_net(NET), model)
    assert np.array_equal(out.blobs[3][0].data, later["fc"][0])


def test_rejected_filler_aborts_even_for_a_copied_layer(parse_net, write_model):
    _, model = write_model(pretrained())
    report = weights.check(parse_net(NET.replace("std: 0.01", "std: 0")), model)
    assert rows(report)["fc"].status == COPIED
    assert not report.ok and "layer 'fc'" in report.abort and "std > 0" in report.abort


def test_phase_picks_the_layers(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET + textwrap.dedent("""
        layer { name: "aux" type: "InnerProduct" bottom: "fc" top: "aux" include { phase: TEST }
                inner_product_param { num_output: 2 } }
    """))
    assert "aux" not in rows(weights.check(net, model))
    assert rows(weights.check(net, model, phase="TEST"))["aux"].status == FRESH


def test_legacy_v1_weights_are_upgraded_first(schema, parse_net, tmp_path):
    arrays = source_arrays()
    net = schema.new("NetParameter")
    blobs = []
    for name, kind in (("conv1", "CONVOLUTION"), ("relu1", "RELU"), ("fc", "INNER_PRODUCT")):
        layer = net.layers.add()
        layer.name = name
        layer.type = layer.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_name[kind].number
        blobs.append([legacy_blob(a.reshape((1,) * (4 - a.ndim) + a.shape)) for a in arrays.get(name, [])])
    path = str(tmp_path / "v1.caffemodel")
    save_model(Model(net, blobs), path)
    report = weights.check(parse_net(NET), load_model(path, schema))
    assert report.ok and [r.status for r in report.layers] == [COPIED, COPIED]


def test_data_layer_shape_comes_from_input_shapes(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET.replace(
        'type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } }',
        'type: "Data" top: "data" top: "label" data_param { batch_size: 2 }',
    ))
    with pytest.raises(CaffeFtError, match="data"):
        weights.check(net, model)
    assert weights.check(net, model, input_shapes={"data": (2, 3, 8, 8)}).ok


def test_init_is_reproducible_by_seed(parse_net, write_model):
    _, model = write_model(pretrained())
    net = parse_net(NET.replace('"fc"', '"fc_new"'))
    first = weights.init(net, model, seed=1).blobs[3][0].data
    assert np.array_equal(first, weights.init(net, model, seed=1).blobs[3][0].data)
    assert not np.array_equal(first, weights.init(net, model, seed=2).blobs[3][0].data)


# ------------------------------------------------------------------- CLI --


def run(*args: str):
    return cli_runner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def files(tmp_path, write_model):
    """(write a net text -> path, path of the pretrained weights)."""

    def net_file(text: str, name: str = "net.prototxt") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return net_file, write_model(pretrained())[0]


def test_cli_check_exit_codes_and_json(files):
    net_file, model = files
    ok = run("check", net_file(NET), "--weights", model)
    assert ok.exit_code == 0 and "COPIED" in ok.output
    bad = run("check", net_file(NET.replace("num_output: 10", "num_output: 3")), "--weights", model, "--json")
    assert bad.exit_code == 1
    data = json.loads(bad.output)
    assert data["ok"] is False and "Cannot copy param 0" in data["abort"]
    assert {row["name"]: row["status"] for row in data["layers"]} == {"conv1": COPIED, "fc": MISMATCH}
    assert data["layers"][1]["source_shapes"] == [[10, 144], [10]]
    missing = run("check", net_file(NET), "--weights", model + ".nope")
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1


def test_cli_check_input_shape_option(files):
    net_file, model = files
    path = net_file(NET.replace('type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } }',
                                'type: "Data" top: "data" data_param { batch_size: 2 }'))
    assert run("check", path, "--weights", model).exit_code == 2
    assert run("check", path, "--weights", model, "--input-shape", "data=2,3,8,8").exit_code == 0
    assert run("check", path, "--weights", model, "--input-shape", "data").exit_code == 2


def test_cli_init_writes_a_loadable_model_and_never_the_input(files, schema, tmp_path):
    net_file, model = files
    net = net_file(NET.replace('"fc"', '"fc_new"'))
    out = str(tmp_path / "out.caffemodel")
    result = run("init", net, "--weights", model, "-o", out, "--seed", "3")
    assert result.exit_code == 0 and "1 layers copied, 1 filled fresh" in result.output
    written = load_model(out, schema)
    assert [layer.name for layer in written.layers][3] == "fc_new"
    # The written model, used as weights for the same net, copies everything.
    assert run("check", net, "--weights", out).exit_code == 0
    again = str(tmp_path / "again.caffemodel")
    run("init", net, "--weights", model, "-o", again, "--seed", "3")
    assert open(out, "rb").read() == open(again, "rb").read()
    before = open(model, "rb").read()
    refused = run("init", net, "--weights", model, "-o", model)
    assert refused.exit_code == 2 and open(model, "rb").read() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_init_refuses_a_mismatch(files, tmp_path):
    net_file, model = files
    out = tmp_path / "out.caffemodel"
    result = run("init", net_file(NET.replace("num_output: 10", "num_output: 3")), "--weights", model, "-o", out)
    assert result.exit_code == 2 and "mismatched: fc" in result.stderr and not out.exists()


def test_cli_typo_warning_on_init(files, tmp_path):
    net_file, model = files
    result = run("init", net_file(NET.replace('name: "conv1"', 'name: "Conv1"')), "--weights", model,
                 "-o", tmp_path / "o.caffemodel")
    assert result.exit_code == 0 and "LIKELY TYPO" in result.stderr and "'conv1'" in result.stderr


# ------------------------------------------------------ against real Caffe --

# Every layer type with parameters that a fine-tuned net commonly has.
CAFFE_NET = """
name: "agree"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.01 }
                              bias_filler { type: "constant" value: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
# What a fine-tuner makes of it: a new head, a typo, and an upsampling branch.
CAFFE_TARGET = CAFFE_NET.replace('"fc"', '"fc_new"').replace("num_output: 10", "num_output: 3").replace(
    'name: "scale1"', 'name: "scale_1"') + """
layer { name: "up" type: "Deconvolution" bottom: "conv1" top: "up"
        convolution_param { num_output: 4 group: 4 kernel_size: 4 stride: 2 bias_term: false
                            weight_filler { type: "bilinear" } } }
"""


def _pycaffe_weights(proto: str, path: str) -> dict:
    """Make random weights for ``proto`` with pycaffe and save them; return them by layer."""
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(proto, caffe.TEST)
    values = {}
    for name, params in net.params.items():
        for param in params:
            param.data[...] = RNG.standard_normal(param.data.shape).astype(np.float32)
        values[name] = [param.data.copy() for param in params]
    net.save(path)
    return values


def _pycaffe_copy_from(proto: str, path: str) -> dict:
    import caffe

    net = caffe.Net(proto, caffe.TEST)
    net.copy_from(path)
    return {name: [param.data.copy() for param in params] for name, params in net.params.items()}


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.caffe
def test_check_agrees_with_pycaffe_copy_from(tmp_path, schema, parse_net):
    source_proto = _write(tmp_path, "source.prototxt", CAFFE_NET)
    target_proto = _write(tmp_path, "target.prototxt", CAFFE_TARGET)
    weights_path = str(tmp_path / "source.caffemodel")
    source = _pycaffe_weights(source_proto, weights_path)
    report = weights.check(parse_net(CAFFE_TARGET), load_model(weights_path, schema), phase="TEST")
    loaded = _pycaffe_copy_from(target_proto, weights_path)
    assert set(rows(report)) == set(loaded)  # the same learnable layers
    assert report.ok
    statuses = {name: row.status for name, row in rows(report).items()}
    assert statuses == {"conv1": COPIED, "bn1": COPIED, "scale_1": FRESH, "prelu1": COPIED, "fc_new": FRESH, "up": FRESH}
    assert rows(report)["scale_1"].likely_typo == "scale1"
    for name, row in rows(report).items():
        assert [v.shape for v in loaded[name]] == list(row.target_shapes)
        if row.status == COPIED:
            assert all(np.array_equal(a, b) for a, b in zip(loaded[name], source[name]))
    # FRESH layers hold Caffe's filler values, never the ignored source's.
    assert not np.array_equal(loaded["scale_1"][0], source["scale1"][0])
    ours = weights.init(parse_net(CAFFE_TARGET), load_model(weights_path, schema), seed=0, phase="TEST")
    fresh = dict(zip((layer.name for layer in ours.layers), ours.blobs))
    for name, index in (("scale_1", 0), ("scale_1", 1), ("fc_new", 1), ("up", 0)):  # constant 1, 0, 0.5; bilinear
        assert np.array_equal(loaded[name][index], fresh[name][index].data), (name, index)
    assert abs(loaded["fc_new"][0].std() - 0.01) < 0.004  # gaussian: only the distribution can match
    assert abs(fresh["fc_new"][0].data.std() - 0.01) < 0.004
    # pycaffe reads the init-written file back exactly.
    init_path = str(tmp_path / "init.caffemodel")
    save_model(ours, init_path)
    back = _pycaffe_copy_from(target_proto, init_path)
    for name, blobs in fresh.items():
        for index, blob in enumerate(blobs):
            assert np.array_equal(back[name][index], blob.data), (name, index)


def _legacy_copy(model: Model) -> Model:
    """``model`` with every blob stored the old 4-D way, right-aligned."""
    blobs = [
        [legacy_blob(b.data.reshape((1,) * (4 - len(b.shape)) + tuple(b.shape))) for b in layer]
        for layer in model.blobs
    ]
    return Model(model.net, blobs)


@pytest.mark.caffe
@pytest.mark.parametrize(
    "edit, legacy",
    [
        (lambda text: text.replace("num_output: 10", "num_output: 3"), False),  # a shape mismatch
        (lambda text: text.replace("num_output: 10", "num_output: 3"), True),  # ... against 4-D legacy blobs
        (lambda text: text.replace("num_output: 10", "num_output: 10 bias_term: false"), False),  # blob count
        (lambda text: text.replace("std: 0.01", "std: 0"), False),  # a filler Caffe rejects
    ],
    ids=["shape", "legacy-shape", "blob-count", "filler"],
)
def test_predicted_abort_is_pycaffes(tmp_path, schema, parse_net, edit, legacy):
    weights_path = str(tmp_path / "source.caffemodel")
    _pycaffe_weights(_write(tmp_path, "source.prototxt", CAFFE_NET), weights_path)
    if legacy:
        save_model(_legacy_copy(load_model(weights_path, schema)), weights_path + ".legacy")
        weights_path += ".legacy"
    target_text = edit(CAFFE_NET)
    target_proto = _write(tmp_path, "target.prototxt", target_text)
    report = weights.check(parse_net(target_text), load_model(weights_path, schema), phase="TEST")
    assert not report.ok
    code = "import caffe, sys; caffe.set_mode_cpu(); caffe.Net(sys.argv[1], caffe.TEST).copy_from(sys.argv[2])"
    died = subprocess.run([sys.executable, "-c", code, target_proto, weights_path],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert died.returncode != 0
    if report.problems:
        assert "Check failed" in died.stderr
    else:
        assert report.abort in died.stderr
    result = run("check", target_proto, "--weights", weights_path, "--phase", "TEST")
    assert result.exit_code == 1 and "Caffe would abort" in result.output


@pytest.mark.caffe
def test_random_fillers_match_caffes_distributions(tmp_path, schema, parse_net):
    """Fresh values have the spread, bounds and sparsity Caffe's own fillers give the same layer."""
    import caffe

    from caffe_ft.net import fillers

    specs = {
        "xavier_avg": 'type: "xavier" variance_norm: AVERAGE',
        "msra_out": 'type: "msra" variance_norm: FAN_OUT',
        "uniform": 'type: "uniform" min: -0.5 max: 2',
        "sparse": 'type: "gaussian" std: 0.1 sparse: 64',
        "unitball": 'type: "positive_unitball"',
    }
    text = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 8 dim: 16 dim: 16 } } }\n'
    for name, spec in specs.items():
        text += (f'layer {{ name: "{name}" type: "Convolution" bottom: "data" top: "{name}" convolution_param '
                 f'{{ num_output: 256 kernel_size: 3 bias_term: false weight_filler {{ {spec} }} }} }}\n')
    caffe.set_mode_cpu()
    theirs = caffe.Net(_write(tmp_path, "fillers.prototxt", text), caffe.TEST).params
    net = parse_net(text)
    rng = np.random.default_rng(0)
    for layer in net.layer[1:]:
        expected = theirs[layer.name][0].data
        ours = fillers.fill_layer(layer, [expected.shape], rng)[0]
        assert abs(np.mean(ours == 0) - np.mean(expected == 0)) < 0.03, layer.name  # sparse: 64 / 256 kept
        ours, expected = ours[ours != 0], expected[expected != 0]
        spread = expected.std()
        assert abs(ours.std() / spread - 1) < 0.05, layer.name
        assert abs(ours.mean() - expected.mean()) < 0.05 * spread, layer.name
        # Quantiles and bounds: the same shape of distribution, not just the same moments.
        quantiles = [0, 5, 50, 95, 100] if layer.name in ("uniform", "xavier_avg") else [5, 50, 95]
        assert np.allclose(np.percentile(ours, quantiles), np.percentile(expected, quantiles), atol=0.2 * spread, rtol=0)


@pytest.mark.caffe
def test_legacy_blobs_load_in_pycaffe_as_check_says(tmp_path, schema, parse_net):
    proto = _write(tmp_path, "net.prototxt", CAFFE_NET)
    weights_path = str(tmp_path / "source.caffemodel")
    source = _pycaffe_weights(proto, weights_path)
    legacy_path = weights_path + ".legacy"
    save_model(_legacy_copy(load_model(weights_path, schema)), legacy_path)
    report = weights.check(parse_net(CAFFE_NET), load_model(legacy_path, schema), phase="TEST")
    assert report.ok and {row.status for row in report.layers} == {COPIED}
    loaded = _pycaffe_copy_from(proto, legacy_path)
    for name, values in source.items():
        assert all(np.array_equal(a, b) for a, b in zip(loaded[name], values))


@pytest.mark.caffe
def test_init_for_a_new_nsfw_head_loads_in_pycaffe_and_opencv(tmp_path, schema):
    import re

    import caffe
    import cv2

    from caffe_ft.formats import files

    caffe.set_mode_cpu()
    proto = os.path.join(NSFW_DIR, "deploy.prototxt")
    pretrained_path = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
    with open(proto) as handle:
        text = handle.read()
    new_text, edits = re.subn(r"num_output: 2\b", "num_output: 5", text.replace('"fc_nsfw"', '"fc_new"'))
    assert edits == 1
    new_proto = _write(tmp_path, "deploy_new.prototxt", new_text)
    net = files.load_text(new_proto, schema, files.NET).message
    model = load_model(pretrained_path, schema)
    report = weights.check(net, model)
    assert report.ok and [r.name for r in report.by_status(FRESH)] == ["fc_new"]
    assert [i.name for i in report.ignored] == ["fc_nsfw"] and len(report.by_status(COPIED)) > 100
    out_path = str(tmp_path / "init.caffemodel")
    save_model(weights.init(net, model, seed=0), out_path)

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

    def run_caffe(prototxt, caffemodel):
        net = caffe.Net(prototxt, caffemodel, caffe.TEST)
        net.blobs["data"].data[...] = x
        net.forward()
        return net.blobs["pool"].data.copy(), net.blobs["prob"].data.copy()

    pool_new, prob_new = run_caffe(new_proto, out_path)
    pool_old, _ = run_caffe(proto, pretrained_path)
    assert prob_new.shape == (1, 5)
    assert np.allclose(pool_new, pool_old, atol=1e-5, rtol=0)  # the copied trunk computes the same features
    cv_net = cv2.dnn.readNetFromCaffe(new_proto, out_path)
    cv_net.setInput(x)
    prob_cv = cv_net.forward("prob")
    assert np.allclose(prob_cv.reshape(prob_new.shape), prob_new, atol=1e-4, rtol=0)


def test_all_finite_sees_every_nan_and_inf_without_a_full_size_temporary():
    """The one-pass float64 sum says "finite" only when every value is; a sum
    that overflows on finite float64 values is confirmed chunk by chunk."""
    from caffe_ft.formats import caffemodel

    data = np.arange(3 * caffemodel._CHUNK + 5, dtype=np.float32)
    assert caffemodel.all_finite(data)
    for bad in (np.nan, np.inf, -np.inf):
        spoiled = data.copy()
        spoiled[-1] = bad  # in the last, partial chunk
        assert not caffemodel.all_finite(spoiled)
    big = np.full(8, 1e308)  # finite, but its sum overflows
    assert caffemodel.all_finite(big)
    big[3] = np.inf
    assert not caffemodel.all_finite(big)
    huge = np.full((4, 4), 3.4e38, dtype=np.float32)  # float32 maxima sum finitely in float64
    assert caffemodel.all_finite(huge)


def test_inspect_and_upgrade_sniff_a_caffemodel_without_reading_it_whole(write_model, tmp_path, monkeypatch):
    """Text or binary is told from the first bytes; the weights are mapped, never read into memory."""
    from caffe_ft.formats import files

    path, _ = write_model([("fc", "InnerProduct", [np.ones((3, 4)), np.zeros(3)])])

    def refuse(name):
        raise AssertionError(f"{name} was read whole")

    monkeypatch.setattr(files, "read_bytes", refuse)
    shown = cli_runner().invoke(main, ["inspect", path])
    assert shown.exit_code == 0, shown.output
    assert "fc" in shown.output
    upgraded = cli_runner().invoke(main, ["upgrade", path, "-o", str(tmp_path / "out.caffemodel")])
    assert upgraded.exit_code == 0, upgraded.output
    assert open(tmp_path / "out.caffemodel", "rb").read() == open(path, "rb").read()


@pytest.mark.parametrize("where", [0, 1439])  # the first value, and the last one, many buffers in
def test_init_and_save_checks_copied_blobs_while_copying_them(parse_net, write_model, tmp_path, monkeypatch, where):
    """``init -o`` checks the copied weights for NaN/inf in the buffer it copies
    them through (one pass, not a scan then a copy): the refusal is
    init_checked's, word for word, and no file (nor temporary) is left."""
    from caffe_ft.formats import caffemodel

    arrays = source_arrays()
    arrays["fc"][0][-1 if where else 0, -1 if where else 0] = np.nan
    _, model = write_model(pretrained(arrays))
    with pytest.raises(CaffeFtError) as scanned_first:
        weights.init_checked(parse_net(NET), model)
    monkeypatch.setattr(caffemodel, "_COPY_BUFFER", 64)  # many rounds of the buffered copy
    monkeypatch.setattr(caffemodel, "all_finite", lambda data: pytest.fail("scanned outside the copy"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CaffeFtError) as scanned_in_copy:
        weights.init_and_save(parse_net(NET), model, str(out_dir / "init.caffemodel"))
    assert str(scanned_in_copy.value) == str(scanned_first.value)
    assert "layer 'fc' blob 0: 1 NaN and 0 inf of 1,440 values" in str(scanned_in_copy.value)
    assert os.listdir(out_dir) == []


def test_init_and_save_writes_what_init_and_save_model_write(parse_net, write_model, tmp_path, schema):
    """The one-pass path writes the same bytes and reports the same check as init_checked + save_model,
    float64 sources (converted, so scanned before the write) included."""
    arrays = source_arrays()
    arrays["conv1"] = [values.astype(np.float64) for values in arrays["conv1"]]
    _, model = write_model(pretrained(arrays))
    report = weights.init_and_save(parse_net(NET), model, str(tmp_path / "one-pass.caffemodel"), seed=3)
    expected_report, expected = weights.init_checked(parse_net(NET), model, seed=3)
    save_model(expected, str(tmp_path / "two-pass.caffemodel"))
    assert (tmp_path / "one-pass.caffemodel").read_bytes() == (tmp_path / "two-pass.caffemodel").read_bytes()
    assert report == expected_report and report.usable
    arrays["conv1"][0][0, 0, 0, 0] = np.inf  # a float64 source is still scanned before anything is written
    _, model = write_model(pretrained(arrays))
    with pytest.raises(CaffeFtError, match="layer 'conv1' blob 0: 0 NaN and 1 inf of 108 values"):
        weights.init_and_save(parse_net(NET), model, str(tmp_path / "nan.caffemodel"))
    assert not (tmp_path / "nan.caffemodel").exists()
