"""caffe_ft.recipe.advise: measured similarity (BatchNorm statistics, linear probes)
and the size x similarity advice (``caffe-ft advise``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from caffe_ft.recipe import advise as adv

import feature_nets  # noqa: E402
from conftest import NSFW_DIR, cli_runner  # noqa: E402
from ft_nets import CAFFENET  # noqa: E402

NSFW_NET = os.path.join(NSFW_DIR, "deploy.prototxt")
NSFW_WEIGHTS = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
# open_nsfw's own preprocessing: 256 x 256, centre 224, BGR mean
NSFW_TRANSFORM = {"new_height": 256, "new_width": 256, "crop_size": 224, "mean_values": (104.0, 117.0, 123.0)}

# --------------------------------------------------------------------------
# Pure parts


def test_bn_statistics_divide_by_the_moving_average_factor():
    mean, var = adv.bn_statistics([np.array([2.0, 4.0]), np.array([8.0, 6.0]), np.array([2.0])])
    np.testing.assert_array_equal(mean, [1.0, 2.0])
    np.testing.assert_array_equal(var, [4.0, 3.0])
    zero_mean, zero_var = adv.bn_statistics([np.array([2.0]), np.array([8.0]), np.array([0.0])])
    assert zero_mean[0] == 0 and zero_var[0] == 0  # Caffe uses 0 when the factor is 0


def test_bn_shift_measures_mean_in_stored_sds_and_log_variance_ratio():
    mean_shift, var_shift = adv.bn_shift(np.array([1.0, -2.0]), np.array([4.0, 1.0]),
                                         np.array([0.0, 0.0]), np.array([1.0, 4.0]), eps=0.0)
    assert mean_shift == pytest.approx((1.0 / 1.0 + 2.0 / 2.0) / 2)
    assert var_shift == pytest.approx(np.log(4.0))
    same = adv.bn_shift(np.array([0.5]), np.array([2.0]), np.array([0.5]), np.array([2.0]), eps=1e-5)
    assert same == (0.0, 0.0)


def test_moments_accumulate_per_channel_over_batches():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 2, 4, 5)), rng.normal(3, 2, size=(2, 2, 4, 5))
    moments = adv._Moments(np.zeros(2), np.zeros(2))
    moments.add(a)
    moments.add(b)
    both = np.concatenate([a, b])
    mean, var = moments.mean_var()
    np.testing.assert_allclose(mean, both.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(var, both.var(axis=(0, 2, 3)))


def _numbers(**changes):
    numbers = {"bn_layers": 10, "bn_mean_shift": 0.2, "bn_var_shift": 0.3, "penultimate": "pool",
               "probe_penultimate": 0.9, "early": "pool1", "probe_early": 0.85, "probe_examples": 200}
    numbers.update(changes)
    return numbers


def test_similar_data_is_high_with_reasons():
    label, reasons = adv.similarity_label(_numbers())
    assert label == "high"
    assert "mean shift 0.20 sd (within 0.35)" in reasons[0]
    assert "penultimate 'pool' 0.900, early 'pool1' 0.850" in reasons[1]


@pytest.mark.parametrize("changes", [
    {"bn_mean_shift": adv.BN_MEAN_SHIFT_MAX + 0.01},
    {"bn_var_shift": adv.BN_VAR_SHIFT_MAX + 0.01},
    {"probe_penultimate": 0.6, "probe_early": 0.9},
])
def test_any_signal_off_makes_it_low(changes):
    assert adv.similarity_label(_numbers(**changes))[0] == "low"


def test_a_probe_gap_within_its_noise_does_not_count():
    # 0.7 vs 0.85 on 40 examples: two standard errors of the difference are about 0.2
    numbers = _numbers(probe_penultimate=0.7, probe_early=0.85, probe_examples=40)
    assert adv.probe_noise(0.7, 40) > 0.15
    assert adv.similarity_label(numbers)[0] == "high"
    assert adv.similarity_label({**numbers, "probe_examples": 4000})[0] == "low"


def test_without_batchnorm_only_the_probes_speak():
    label, reasons = adv.similarity_label(_numbers(bn_layers=0, bn_mean_shift=9.0))
    assert label == "high" and len(reasons) == 1 and reasons[0].startswith("linear probes")


def test_the_early_layer_is_the_first_pooling(parse_net):
    net = parse_net(CAFFENET)
    index = adv.early_layer(net, len(net.layer))
    assert net.layer[index].name == "pool1"
    assert adv.early_layer(net, index) is None


# --------------------------------------------------------------------------
# With Caffe: the nsfw ResNet-50 on photo-like and on noise images


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory):
    from synth_images import write_dataset

    root = tmp_path_factory.mktemp("advise")
    return {kind: write_dataset(str(root / kind), kind, 30, classes=2, size=256, seed=31) for kind in ("photo", "noise")}


@pytest.fixture(scope="module")
def measured(data_sets):
    return {kind: adv.measure_similarity(NSFW_NET, NSFW_WEIGHTS, listing, transform=NSFW_TRANSFORM, sample=60)
            for kind, listing in data_sets.items()}


@pytest.mark.caffe
def test_photo_like_data_is_similar_and_noise_is_not(measured):
    photo_label, photo = measured["photo"]
    noise_label, noise = measured["noise"]
    assert (photo_label, noise_label) == ("high", "low")
    assert photo["bn_layers"] == noise["bn_layers"] == 53
    assert photo["bn_mean_shift"] < adv.BN_MEAN_SHIFT_MAX < noise["bn_mean_shift"]
    assert photo["images"] == noise["images"] == 60
    assert photo["penultimate"] == "pool" and photo["early"] == "pool1"
    for numbers in (photo, noise):
        assert 0.0 <= numbers["probe_early"] <= 1.0 and 0.0 <= numbers["probe_penultimate"] <= 1.0
        assert len(numbers["reasons"]) == 2


@pytest.mark.caffe
def test_advice_differs_and_shows_its_numbers(data_sets, tmp_path):
    from caffe_ft.cli import main

    runner = cli_runner()
    common = ["--weights", NSFW_WEIGHTS, "--sample", "60", "--resize", "256", "--crop-size", "224",
              "--mean-value", "104", "--mean-value", "117", "--mean-value", "123"]
    photo = runner.invoke(main, ["advise", NSFW_NET, "--train-data", data_sets["photo"], *common])
    assert photo.exit_code == 0, photo.output + photo.stderr
    assert "training examples: 60" in photo.stdout and "similarity: high" in photo.stdout
    assert "BatchNorm inputs: mean shift" in photo.stdout and "linear probes: penultimate 'pool'" in photo.stdout
    assert "(strategy last-fc)" in photo.stdout
    assert "--strategy auto --dataset-size 60 --similarity high" in photo.stdout
    noise = runner.invoke(main, ["advise", NSFW_NET, "--train-data", data_sets["noise"], "--json", *common])
    assert noise.exit_code == 0, noise.output + noise.stderr
    advice = json.loads(noise.stdout)
    assert advice["similarity"] == "low" and advice["strategy"] == "top"
    assert advice["freeze_fraction"] == pytest.approx(1 / 3)
    assert advice["numbers"]["bn_mean_shift"] > adv.BN_MEAN_SHIFT_MAX
    assert "different from" in advice["reason"]


@pytest.mark.caffe
def test_validation_data_scores_the_probes(tmp_path):
    from synth_images import write_dataset

    train = write_dataset(str(tmp_path / "train"), "photo", 12, classes=3, size=40, seed=41)
    val = write_dataset(str(tmp_path / "val"), "photo", 5, classes=3, size=40, seed=42)
    net = tmp_path / "train_val.prototxt"
    net.write_text(feature_nets.train_val(train, val))
    weights = feature_nets.make_weights(str(tmp_path), 4)
    label, numbers = adv.measure_similarity(str(net), weights, train, val)
    assert label in ("high", "low")
    assert numbers["probe_examples"] == 15 and numbers["images"] == 36
    assert numbers["bn_layers"] == 1 and numbers["early"] == "pool1" and numbers["penultimate"] == "fc1"
