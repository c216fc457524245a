"""Caffe's fillers in numpy: distributions, scales from fans, exact values, errors.

Expected numbers come from Caffe 1.0's formulas worked out by hand (fan_in =
count / num, fan_out = count / channels, xavier bound sqrt(3 / n), msra std
sqrt(2 / n), the bilinear kernel), not from the implementation.  Random
fillers are checked statistically on blobs of about a million values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from caffe_ft.net import fillers
from caffe_ft.errors import CaffeFtError


@pytest.fixture
def filler(schema):
    """``filler(type=..., **fields)`` -> a FillerParameter."""

    def make(**fields):
        param = schema.new("FillerParameter")
        for name, value in fields.items():
            setattr(param, name, value)
        return param

    return make


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_constant_gives_exact_values_and_defaults_to_zero(filler):
    values = fillers.fill(filler(type="constant", value=2.5), (3, 4), rng())
    assert values.dtype == np.float32 and values.shape == (3, 4)
    assert np.all(values == 2.5)
    assert np.all(fillers.fill(filler(), (7,), rng()) == 0)  # FillerParameter's default: constant 0


def test_gaussian_mean_and_std(filler):
    values = fillers.fill(filler(type="gaussian", mean=0.5, std=2.0), (1000, 1000), rng())
    assert values.dtype == np.float32
    assert abs(values.mean() - 0.5) < 0.01
    assert abs(values.std() - 2.0) < 0.01


def test_gaussian_sparse_keeps_sparse_over_outputs_of_the_values(filler):
    # 100 outputs, sparse 20: each value non-zero with probability 20 / 100.
    values = fillers.fill(filler(type="gaussian", std=1.0, sparse=20), (100, 10000), rng())
    nonzero = values != 0
    assert abs(nonzero.mean() - 0.2) < 0.005
    assert abs(values[nonzero].std() - 1.0) < 0.01
    assert not np.any(fillers.fill(filler(type="gaussian", sparse=0), (10, 10), rng()))


def test_uniform_bounds_and_moments(filler):
    values = fillers.fill(filler(type="uniform", min=-1.0, max=3.0), (1000, 1000), rng())
    assert values.min() >= -1.0 and values.max() <= 3.0
    assert abs(values.mean() - 1.0) < 0.01
    assert abs(values.std() - 4.0 / math.sqrt(12)) < 0.01


@pytest.mark.parametrize(
    "shape, fan_in, fan_out",
    [
        ((64, 3, 7, 7), 3 * 49, 64 * 49),  # convolution weight
        ((10, 1000), 1000, 10),  # InnerProduct weight (out, in)
        ((5,), 1, 5),  # a bias: num is 5, channels 1
        ((), 1, 1),  # a scalar
        ((1, 1, 10, 20), 200, 200),  # a legacy 4-D InnerProduct weight
    ],
)
def test_fans_follow_caffes_num_and_channels(shape, fan_in, fan_out):
    assert fillers.fans(shape) == (fan_in, fan_out)


@pytest.mark.parametrize("norm, n", [(fillers.FAN_IN, 147), (fillers.FAN_OUT, 4096), (fillers.AVERAGE, (147 + 4096) / 2)])
def test_xavier_bound_is_sqrt_3_over_n(filler, norm, n):
    shape = (4096, 147)  # (out, in): fan_in 147, fan_out 4096
    values = fillers.fill(filler(type="xavier", variance_norm=norm), shape, rng())
    bound = math.sqrt(3.0 / n)
    assert np.abs(values).max() <= bound * (1 + 1e-6)
    assert np.abs(values).max() > bound * 0.999
    assert abs(values.std() - bound / math.sqrt(3)) < 0.01 * bound


@pytest.mark.parametrize("norm, n", [(fillers.FAN_IN, 1000), (fillers.FAN_OUT, 500), (fillers.AVERAGE, 750)])
def test_msra_std_is_sqrt_2_over_n(filler, norm, n):
    values = fillers.fill(filler(type="msra", variance_norm=norm), (500, 1000), rng())
    assert abs(values.mean()) < 0.001
    assert abs(values.std() / math.sqrt(2.0 / n) - 1) < 0.01


def test_bilinear_kernel_exact(filler):
    # K = 4 (upsampling by 2): f = 2, c = 3/4, so the ramp is 1 - |x/2 - 3/4| = .25 .75 .75 .25.
    ramp = np.array([0.25, 0.75, 0.75, 0.25], dtype=np.float32)
    values = fillers.fill(filler(type="bilinear"), (3, 1, 4, 4), rng())
    for channel in values:
        assert np.array_equal(channel[0], np.outer(ramp, ramp))
    # K = 3: f = 2 and c = 3/4 too, which makes Caffe's odd kernel lopsided: .25 .75 .75.
    odd = fillers.fill(filler(type="bilinear"), (1, 1, 3, 3), rng())[0, 0]
    assert np.array_equal(odd[1], np.float32(0.75) * np.array([0.25, 0.75, 0.75], dtype=np.float32))


def test_positive_unitball_rows_sum_to_one(filler):
    values = fillers.fill(filler(type="positive_unitball"), (20, 3, 5, 5), rng())
    assert values.min() >= 0
    assert np.allclose(values.reshape(20, -1).sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "xavier", "msra", "positive_unitball"])
def test_same_seed_same_values(filler, kind):
    param = filler(type=kind)
    first = fillers.fill(param, (50, 20), rng(42))
    assert np.array_equal(first, fillers.fill(param, (50, 20), rng(42)))
    assert not np.array_equal(first, fillers.fill(param, (50, 20), rng(43)))


@pytest.mark.parametrize(
    "fields, shape, words",
    [
        ({"type": "xaviar"}, (4, 4), "unknown filler type 'xaviar'"),
        ({"type": "gaussian", "std": 0.0}, (4, 4), "std > 0"),
        ({"type": "gaussian", "sparse": 5}, (4, 4), "sparse 5 exceeds"),
        ({"type": "gaussian", "sparse": -2}, (4, 4), "sparse >= -1"),
        ({"type": "uniform", "min": 1.0, "max": 0.0}, (4, 4), "min <= max"),
        ({"type": "xavier", "sparse": 2}, (4, 4), "does not support sparse"),
        ({"type": "constant", "sparse": 0}, (4, 4), "does not support sparse"),
        ({"type": "xavier"}, (2, 2, 2, 2, 2), "at most 4 axes"),
        ({"type": "bilinear"}, (2, 2, 4), "4-axis"),
        ({"type": "bilinear"}, (2, 2, 4, 3), "square"),
        ({"type": "constant"}, (0, 4), "empty"),
    ],
)
def test_what_caffe_rejects_is_an_error(filler, fields, shape, words):
    param = filler(**fields)
    assert words in fillers.filler_problem(param, shape)
    with pytest.raises(CaffeFtError, match=words.replace("(", r"\(")):
        fillers.fill(param, shape, rng())


def test_unknown_filler_error_names_the_layer(parse_net):
    layer = parse_net(
        'layer { name: "fc9" type: "InnerProduct" inner_product_param { num_output: 2 weight_filler { type: "Xavier" } } }'
    ).layer[0]
    with pytest.raises(CaffeFtError) as caught:
        fillers.fill_layer(layer, [(2, 8), (2,)], rng())
    assert "fc9" in str(caught.value) and "'Xavier'" in str(caught.value)


def _layer(parse_net, text):
    return parse_net(f"layer {{ {text} }}").layer[0]


def _described(parse_net, text):
    return [fillers.describe(param) for param in fillers.layer_fillers(_layer(parse_net, text))]


def test_default_fillers_per_layer_type(parse_net):
    # No fillers given: FillerParameter's default, constant 0, for weights and bias.
    assert _described(parse_net, 'name: "c" type: "Convolution" convolution_param { num_output: 4 }') == ["constant 0"] * 2
    assert _described(parse_net, 'name: "c" type: "Convolution" convolution_param { bias_term: false }') == ["constant 0"]
    assert _described(
        parse_net,
        'name: "f" type: "InnerProduct" inner_product_param { weight_filler { type: "gaussian" std: 0.01 } '
        'bias_filler { type: "constant" value: 0.1 } }',
    ) == ["gaussian std 0.01", "constant 0.1"]
    assert _described(parse_net, 'name: "d" type: "Deconvolution" convolution_param { weight_filler { type: "bilinear" } }') == [
        "bilinear", "constant 0"]
    assert _described(parse_net, 'name: "e" type: "Embed" embed_param { weight_filler { type: "uniform" } }') == [
        "uniform [0, 1]", "constant 0"]
    # Scale: its factor is constant 1 unless a filler is given; the bias constant 0 unless bias_filler.
    assert _described(parse_net, 'name: "s" type: "Scale" bottom: "x"') == ["constant 1"]
    assert _described(parse_net, 'name: "s" type: "Scale" bottom: "x" scale_param { bias_term: true }') == [
        "constant 1", "constant 0"]
    assert _described(parse_net, 'name: "s" type: "Scale" bottom: "x" scale_param { filler { type: "msra" } }') == ["msra"]
    assert _described(parse_net, 'name: "s" type: "Scale" bottom: "x" bottom: "y" scale_param { bias_term: true }') == [
        "constant 0"]
    assert _described(parse_net, 'name: "b" type: "Bias" bottom: "x"') == ["constant 0"]
    assert _described(parse_net, 'name: "p" type: "PReLU"') == ["constant 0.25"]
    assert _described(parse_net, 'name: "p" type: "PReLU" prelu_param { filler { type: "constant" value: 0.1 } }') == [
        "constant 0.1"]
    assert _described(parse_net, 'name: "bn" type: "BatchNorm"') == ["constant 0"] * 3
    assert _described(parse_net, 'name: "r" type: "ReLU"') == []
    # RNN/LSTM: recurrent_param's weight filler for every matrix, its bias filler for every bias.
    recurrent = 'recurrent_param { weight_filler { type: "uniform" min: -0.1 max: 0.1 } } bottom: "x" bottom: "cont"'
    assert _described(parse_net, f'name: "l" type: "LSTM" {recurrent}') == [
        "uniform [-0.1, 0.1]", "constant 0", "uniform [-0.1, 0.1]"]
    assert _described(parse_net, f'name: "l" type: "LSTM" {recurrent} bottom: "static"') == [
        "uniform [-0.1, 0.1]", "constant 0", "uniform [-0.1, 0.1]", "uniform [-0.1, 0.1]"]
    assert _described(parse_net, f'name: "r" type: "RNN" {recurrent}') == [
        "uniform [-0.1, 0.1]", "constant 0", "uniform [-0.1, 0.1]", "uniform [-0.1, 0.1]", "constant 0"]


def test_fill_layer_prelu_shared_is_a_scalar(parse_net):
    layer = _layer(parse_net, 'name: "p" type: "PReLU" prelu_param { channel_shared: true }')
    (slope,) = fillers.fill_layer(layer, [()], rng())
    assert slope.shape == () and slope == np.float32(0.25)


def test_fill_layer_needs_one_shape_per_blob(parse_net):
    layer = _layer(parse_net, 'name: "f" type: "InnerProduct" inner_product_param { num_output: 2 }')
    with pytest.raises(CaffeFtError, match="layer 'f'"):
        fillers.fill_layer(layer, [(2, 3)], rng())
