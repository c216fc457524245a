"""Fine-tuning strategies (caffe_ft.recipe.strategies).

Every rewrite goes through :func:`rewrite`, which also checks that the input
is left alone, that the output passes ``check_net`` and that a second
run on the output changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netcheck import check_net
from caffe_ft.net import graph
from caffe_ft.formats import prototext
from caffe_ft.errors import CaffeFtError
from caffe_ft.formats.schema import load_schema
from caffe_ft.recipe.strategies import (
    LARGE_DATASET,
    SMALL_DATASET,
    STRATEGIES,
    Result,
    StrategyOptions,
    apply_strategy,
    choose_strategy,
    derived_name,
)

from ft_nets import CAFFENET, CAFFENET_DEPLOY, GOOGLENET, RESNET, SIAMESE, SQUEEZENET

Mults = List[Tuple[float, float]]


def rewrite(net, strategy: str = "last-fc", **fields) -> Result:
    """Apply a strategy; check purity, the output, and idempotence."""
    fields.setdefault("num_classes", 5)
    options = StrategyOptions(**fields)
    before = net.SerializeToString()
    result = apply_strategy(strategy, net, options)
    assert net.SerializeToString() == before, "the input net was changed"
    assert check_net(result.net) == []
    again = apply_strategy(strategy, result.net, options)
    assert prototext.print_message(again.net) == prototext.print_message(result.net)
    assert again.frozen == result.frozen and again.removed == ()
    return result


def layer(net, name: str):
    return net.layer[graph.layer_index(net, name)]


def mults(net, name: str) -> Mults:
    """Explicit (lr_mult, decay_mult) entries of a layer, float32-rounded away."""
    return [(round(p.lr_mult, 6), round(p.decay_mult, 6)) for p in layer(net, name).param]


def names(net) -> List[str]:
    return [each.name for each in net.layer]


FROZEN2: Mults = [(0, 0), (0, 0)]
HEAD: Mults = [(10, 1), (20, 0)]
CAFFE_DEFAULT: Mults = [(1, 1), (2, 0)]


# --------------------------------------------------------------------------
# last-fc


def test_last_fc_on_caffenet(parse_net):
    result = rewrite(parse_net(CAFFENET), num_classes=20)
    net = result.net
    assert result.heads == {"fc8": "fc8_ft"}
    assert result.frozen == ("conv1", "conv2", "fc6", "fc7")
    assert result.removed == ()
    for name in result.frozen:
        assert mults(net, name) == FROZEN2
    head = layer(net, "fc8_ft")
    assert mults(net, "fc8_ft") == HEAD
    assert head.inner_product_param.num_output == 20
    assert list(head.top) == ["fc8_ft"] and list(head.bottom) == ["fc7"]
    # the original fillers are kept
    assert head.inner_product_param.weight_filler.type == "xavier"
    assert head.inner_product_param.bias_filler.value == pytest.approx(0.1)
    assert list(layer(net, "loss").bottom) == ["fc8_ft", "label"]
    assert list(layer(net, "accuracy").bottom) == ["fc8_ft", "label"]
    assert "fc8" not in names(net)
    assert any("froze 4 layer(s)" in note for note in result.notes)
    assert any("'fc8'" in note and "1000 -> 20" in note for note in result.notes)


def test_last_fc_leaves_everything_else_alone(parse_net):
    original = parse_net(CAFFENET)
    net = rewrite(original).net
    for old, new in zip(original.layer, net.layer):
        if old.name == "fc8":
            continue
        expected = type(old)()
        expected.CopyFrom(old)
        if graph.param_blob_count(old):
            del expected.param[:]
            for _ in range(2):
                expected.param.add(lr_mult=0, decay_mult=0)
        expected.bottom[:] = ["fc8_ft" if b == "fc8" else b for b in old.bottom]
        assert new == expected


def test_fresh_fillers_when_the_head_had_none(parse_net):
    net = rewrite(parse_net(CAFFENET_DEPLOY), num_classes=3).net
    params = layer(net, "fc8_ft").inner_product_param
    assert params.num_output == 3
    assert (params.weight_filler.type, round(params.weight_filler.std, 6)) == ("gaussian", 0.01)
    assert (params.bias_filler.type, params.bias_filler.value) == ("constant", 0)
    assert list(layer(net, "prob").bottom) == ["fc8_ft"]
    assert mults(net, "fc8_ft") == HEAD
    assert mults(net, "fc7") == FROZEN2 and mults(net, "conv1") == FROZEN2


def test_very_low_rate_instead_of_frozen(parse_net):
    net = rewrite(parse_net(CAFFENET), frozen_lr_mult=0.001, head_lr_mult=5).net
    assert mults(net, "conv1") == [(0.001, 0), (0.001, 0)]
    assert mults(net, "fc8_ft") == [(5, 1), (10, 0)]


def test_new_name(parse_net):
    result = rewrite(parse_net(CAFFENET), new_name="fc8_flickr")
    assert result.heads == {"fc8": "fc8_flickr"}
    assert list(layer(result.net, "fc8_flickr").top) == ["fc8_flickr"]
    assert list(layer(result.net, "loss").bottom) == ["fc8_flickr", "label"]


def test_derived_names_are_idempotent() -> None:
    options = StrategyOptions(num_classes=2)
    assert derived_name("fc8", options) == "fc8_ft"
    assert derived_name("fc8_ft", options) == "fc8_ft"
    assert derived_name("fc8", StrategyOptions(num_classes=2, new_name="x")) == "x"


def test_a_head_already_renamed_keeps_its_name(parse_net):
    first = rewrite(parse_net(CAFFENET), new_name="fc8_cars").net
    again = apply_strategy("last-fc", first, StrategyOptions(num_classes=7, new_name="fc8_cars"))
    assert again.heads == {"fc8_cars": "fc8_cars"}
    assert layer(again.net, "fc8_cars").inner_product_param.num_output == 7
    assert any("name kept" in note for note in again.notes)


def test_head_output_not_named_like_the_layer_keeps_its_blob(parse_net):
    net = parse_net(
        """
        layer { name: "in" type: "Input" top: "x" }
        layer { name: "fc" type: "InnerProduct" bottom: "x" top: "score" inner_product_param { num_output: 9 } }
        layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
        """
    )
    result = rewrite(net)
    assert list(layer(result.net, "fc_ft").top) == ["score"]
    assert list(layer(result.net, "prob").bottom) == ["score"]


def test_blob_renaming_stops_where_the_blob_is_redefined(parse_net):
    net = parse_net(
        """
        layer { name: "in" type: "Input" top: "x" top: "label" }
        layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 9 } }
        layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
        layer { name: "other" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 2 } }
        layer { name: "sig" type: "Sigmoid" bottom: "fc" top: "sig" }
        """
    )
    result = rewrite(net)
    out = result.net
    assert list(layer(out, "relu").bottom) == ["fc_ft"] and list(layer(out, "relu").top) == ["fc_ft"]
    assert list(layer(out, "loss").bottom) == ["fc_ft", "label"]
    assert list(layer(out, "other").top) == ["fc"]
    assert list(layer(out, "sig").bottom) == ["fc"]


def test_squeezenet_convolution_head(parse_net):
    result = rewrite(parse_net(SQUEEZENET), num_classes=2)
    net = result.net
    assert result.heads == {"conv10": "conv10_ft"}
    head = layer(net, "conv10_ft")
    assert head.convolution_param.num_output == 2
    assert head.convolution_param.kernel_size == [1]
    assert head.convolution_param.weight_filler.type == "gaussian"  # kept
    assert mults(net, "conv10_ft") == HEAD
    relu = layer(net, "relu_conv10")
    assert list(relu.bottom) == ["conv10_ft"] and list(relu.top) == ["conv10_ft"]
    assert list(layer(net, "pool10").bottom) == ["conv10_ft"]
    assert mults(net, "conv1") == FROZEN2  # a missing param entry would mean lr_mult 1


def test_googlenet_last_fc_removes_the_side_heads(parse_net):
    original = parse_net(GOOGLENET)
    result = rewrite(original, num_classes=4)
    net = result.net
    assert result.heads == {"loss3/classifier": "loss3/classifier_ft"}
    side = {n for n in names(original) if n.startswith(("loss1/", "loss2/"))}
    assert set(result.removed) == side and len(side) == 18
    assert not side & set(names(net))
    assert layer(net, "loss3/classifier_ft").inner_product_param.num_output == 4
    assert list(layer(net, "loss3/loss3").bottom) == ["loss3/classifier_ft", "label"]
    assert "conv1/7x7_s2" in result.frozen and "inception_5b/3x3" in result.frozen
    removal_notes = [note for note in result.notes if "removed auxiliary head" in note]
    assert len(removal_notes) == 2


def test_googlenet_new_name_applies_to_the_one_kept_head(parse_net):
    result = rewrite(parse_net(GOOGLENET), new_name="cls")
    assert result.heads == {"loss3/classifier": "cls"}


def test_googlenet_full_replaces_every_head(parse_net):
    result = rewrite(parse_net(GOOGLENET), "full", num_classes=4)
    net = result.net
    assert result.frozen == () and result.removed == ()
    assert sorted(result.heads.values()) == [f"loss{n}/classifier_ft" for n in (1, 2, 3)]
    for n in (1, 2, 3):
        assert layer(net, f"loss{n}/classifier_ft").inner_product_param.num_output == 4
        assert mults(net, f"loss{n}/classifier_ft") == HEAD
    # trainable layers keep their multipliers
    assert mults(net, "inception_4a/1x1") == CAFFE_DEFAULT


def test_googlenet_top_keeps_side_heads_that_reach_trained_layers(parse_net):
    # loss1 leaves the trunk after inception_4a (frozen): removed; loss2 leaves
    # it after inception_4d (trains): kept, at the new class count
    result = rewrite(parse_net(GOOGLENET), "top", num_classes=4, freeze_until="inception_4a/output")
    net = result.net
    assert set(result.heads) == {"loss2/classifier", "loss3/classifier"}
    assert {n for n in result.removed} == {n for n in names(parse_net(GOOGLENET)) if n.startswith("loss1/")}
    assert result.frozen == ("conv1/7x7_s2", "inception_4a/1x1", "inception_4a/3x3")
    assert layer(net, "loss2/classifier_ft").inner_product_param.num_output == 4
    assert mults(net, "loss2/fc") == CAFFE_DEFAULT  # the side branch trains as before
    assert mults(net, "inception_4d/1x1") == CAFFE_DEFAULT


def test_googlenet_new_name_with_several_heads_is_an_error(parse_net):
    with pytest.raises(CaffeFtError, match="--new-name needs a single head, but 3 heads"):
        apply_strategy("full", parse_net(GOOGLENET), StrategyOptions(num_classes=4, new_name="x"))


def test_resnet_last_fc_freezes_batch_norm_statistics(parse_net):
    original = parse_net(RESNET)
    net = rewrite(original).net
    for name in ("bn_conv1", "bn_res2a_branch2a"):
        bn = layer(net, name)
        assert bn.batch_norm_param.use_global_stats is True
        assert list(bn.param) == list(layer(original, name).param)  # never changed
    assert mults(net, "scale_conv1") == FROZEN2
    assert mults(net, "conv1") == [(0, 0)]  # bias_term: false: one blob
    assert mults(net, "fc1000_ft") == HEAD


def test_top_freeze_until_a_batch_norm_freezes_its_scale(parse_net):
    result = rewrite(parse_net(RESNET), "top", freeze_until="bn_res2a_branch2a")
    net = result.net
    assert result.frozen == ("conv1", "bn_conv1", "scale_conv1", "res2a_branch2a",
                             "bn_res2a_branch2a", "scale_res2a_branch2a")
    assert mults(net, "scale_res2a_branch2a") == FROZEN2
    assert layer(net, "bn_res2a_branch2a").batch_norm_param.use_global_stats


def test_top_leaves_batch_norm_in_the_training_part_alone(parse_net):
    result = rewrite(parse_net(RESNET), "top", freeze_until="scale_conv1")
    net = result.net
    assert result.frozen == ("conv1", "bn_conv1", "scale_conv1")
    assert not layer(net, "bn_res2a_branch2a").HasField("batch_norm_param")
    assert list(layer(net, "res2a_branch2a").param) == []
    assert list(layer(net, "scale_res2a_branch2a").param) == []


def test_top_train_last_counts_scale_layers_and_keeps_them_with_their_batch_norm(parse_net):
    # learnable layers: conv1, scale_conv1, res2a_branch2a, scale_res2a_branch2a, fc1000
    result = rewrite(parse_net(RESNET), "top", train_last=2)
    assert result.frozen == ("conv1", "bn_conv1", "scale_conv1", "res2a_branch2a")
    assert not layer(result.net, "bn_res2a_branch2a").HasField("batch_norm_param")
    assert any("the last 2 of 5 learnable layers" in note for note in result.notes)
    assert rewrite(parse_net(RESNET), "top", train_last=5).frozen == ()


def test_top_freeze_fraction(parse_net):
    # CaffeNet: 5 learnable layers; a third of them is floor(5/3) = 1 frozen
    assert rewrite(parse_net(CAFFENET), "top", freeze_fraction=1 / 3).frozen == ("conv1",)
    assert rewrite(parse_net(CAFFENET), "top", freeze_fraction=2 / 3).frozen == ("conv1", "conv2", "fc6")


def test_previously_frozen_layers_train_with_caffe_defaults(parse_net):
    frozen = rewrite(parse_net(CAFFENET)).net
    result = rewrite(frozen, "full")
    net = result.net
    for name in ("conv1", "conv2", "fc6", "fc7"):
        assert mults(net, name) == CAFFE_DEFAULT
    assert any("had lr_mult 0" in note for note in result.notes)
    top = rewrite(frozen, "top", freeze_until="conv2").net
    assert mults(top, "conv1") == FROZEN2 and mults(top, "fc6") == CAFFE_DEFAULT


def test_full_keeps_user_multipliers_and_batch_norm(parse_net):
    original = parse_net(RESNET)
    layer(original, "bn_conv1").batch_norm_param.use_global_stats = True
    layer(original, "conv1").param.add(lr_mult=0.5, decay_mult=2)
    net = rewrite(original, "full").net
    assert mults(net, "conv1") == [(0.5, 2)]
    assert layer(net, "bn_conv1").batch_norm_param.use_global_stats
    assert not layer(net, "bn_res2a_branch2a").HasField("batch_norm_param")
    assert list(layer(net, "scale_conv1").param) == []


def test_siamese_shared_parameters_stay_consistent(parse_net):
    result = rewrite(parse_net(SIAMESE), "top", freeze_until="conv1")
    net = result.net
    # conv1 is frozen, so its twin conv1_p (after the cut) is frozen too
    assert result.frozen == ("conv1", "conv1_p")
    assert [p.name for p in layer(net, "conv1_p").param] == ["conv1_w", "conv1_b"]
    assert mults(net, "conv1_p") == FROZEN2
    assert mults(net, "ip1_p") == [(1, 1), (2, 1)]
    # both classifiers are main heads (same loss weight), renamed, still sharing
    assert result.heads == {"cls": "cls_ft", "cls_p": "cls_p_ft"}
    assert [p.name for p in layer(net, "cls_p_ft").param] == ["cls_w", "cls_b"]
    assert mults(net, "cls_ft") == mults(net, "cls_p_ft") == HEAD


def test_siamese_last_fc(parse_net):
    result = rewrite(parse_net(SIAMESE))
    assert result.removed == ()
    assert set(result.frozen) == {"conv1", "ip1", "conv1_p", "ip1_p"}


def test_explicit_heads_override_detection(parse_net):
    result = rewrite(parse_net(CAFFENET), heads=("fc8",))
    assert result.heads == {"fc8": "fc8_ft"}
    net = parse_net(
        """
        layer { name: "in" type: "Input" top: "x" top: "label" }
        layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 9 } }
        layer { name: "temp" type: "Scale" bottom: "fc" top: "fc" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
        """
    )
    result = rewrite(net, heads=("fc",))
    assert result.heads == {"fc": "fc_ft"}
    assert mults(result.net, "temp") == [(0, 0)]


# --------------------------------------------------------------------------
# Errors


def _error(parse_net, text: str, strategy: str = "last-fc", **fields) -> str:
    fields.setdefault("num_classes", 5)
    with pytest.raises(CaffeFtError) as caught:
        apply_strategy(strategy, parse_net(text), StrategyOptions(**fields))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_error_no_head(parse_net):
    text = """
    layer { name: "in" type: "Input" top: "x" top: "y" }
    layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 2 } }
    layer { name: "loss" type: "ContrastiveLoss" bottom: "fc" bottom: "fc" bottom: "y" top: "loss" }
    """
    message = _error(parse_net, text)
    assert "no classifier head found" in message
    assert "fc (InnerProduct)" in message and "--head LAYER" in message


def test_error_scale_before_the_loss(parse_net):
    text = """
    layer { name: "in" type: "Input" top: "x" top: "label" }
    layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 2 } }
    layer { name: "temp" type: "Scale" bottom: "fc" top: "fc" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
    """
    message = _error(parse_net, text)
    assert "'temp'" in message and "temp (Scale)" in message and "--head LAYER" in message


@pytest.mark.parametrize(
    "strategy, fields, expected",
    [
        ("last-fc", {"num_classes": 1}, "at least 2"),
        ("last-fc", {"head_lr_mult": 0}, "must be positive"),
        ("last-fc", {"frozen_lr_mult": -1}, "0 or more"),
        ("last-fc", {"train_last": 2}, "--train-last only applies to --strategy top"),
        ("full", {"freeze_until": "fc6"}, "--freeze-until only applies"),
        ("top", {}, "exactly one of --freeze-until LAYER or --train-last K (got neither)"),
        ("top", {"freeze_until": "fc6", "train_last": 2}, "got --freeze-until and --train-last"),
        ("top", {"freeze_until": "fc_6"}, "no layer named 'fc_6' (did you mean 'fc6'"),
        ("top", {"freeze_until": "fc8"}, "not before the head 'fc8'"),
        ("top", {"freeze_until": "loss"}, "not before the head 'fc8'"),
        ("top", {"train_last": 0}, "between 1 and 5"),
        ("top", {"train_last": 6}, "between 1 and 5"),
        ("top", {"freeze_fraction": 1.0}, "freeze_fraction must be in [0, 1)"),
        ("last-fc", {"heads": ("fc_8",)}, "did you mean 'fc8'"),
        ("last-fc", {"heads": ("relu7",)}, "'relu7' is a ReLU layer"),
        ("last-fc", {"heads": ("fc7",)}, "--head 'fc7' feeds 'fc8' (InnerProduct)"),
        ("last-fc", {"new_name": "fc7"}, "cannot rename head 'fc8' to 'fc7'"),
        ("last-fc", {"new_name": " "}, "must not be empty"),
    ],
)
def test_option_errors(parse_net, strategy, fields, expected):
    assert expected in _error(parse_net, CAFFENET, strategy, **fields)


def test_unknown_strategy(parse_net):
    with pytest.raises(CaffeFtError, match="unknown strategy 'all' .choose from last-fc, top, full"):
        apply_strategy("all", parse_net(CAFFENET), StrategyOptions(num_classes=2))


def test_registry_functions_validate_too(parse_net):
    with pytest.raises(CaffeFtError, match="at least 2"):
        STRATEGIES["full"](parse_net(CAFFENET), StrategyOptions(num_classes=1))


# --------------------------------------------------------------------------
# choose_strategy


@pytest.mark.parametrize(
    "size, similarity, strategy, fraction",
    [
        (SMALL_DATASET - 1, "high", "last-fc", None),
        (SMALL_DATASET - 1, "low", "top", 1 / 3),
        (SMALL_DATASET, "high", "top", 2 / 3),
        (LARGE_DATASET, "low", "top", 1 / 3),
        (LARGE_DATASET + 1, "high", "full", None),
        (LARGE_DATASET + 1, "low", "full", None),
    ],
)
def test_choose_strategy(size, similarity, strategy, fraction):
    base = StrategyOptions(num_classes=2, head_lr_mult=5)
    name, options, reason = choose_strategy(size, similarity, base)
    assert name == strategy
    assert options.freeze_fraction == fraction
    assert options.head_lr_mult == 5 and options.num_classes == 2  # the rest is kept
    assert str(size) in reason and strategy in reason


def test_choose_strategy_rejects_bad_input() -> None:
    base = StrategyOptions(num_classes=2)
    with pytest.raises(CaffeFtError, match="at least 1 image"):
        choose_strategy(0, "high", base)
    with pytest.raises(CaffeFtError, match="'high' or 'low'"):
        choose_strategy(100, "medium", base)
    with pytest.raises(CaffeFtError, match="auto decides how much to freeze"):
        choose_strategy(100, "low", StrategyOptions(num_classes=2, train_last=3))


def test_chosen_options_apply(parse_net):
    name, options, _ = choose_strategy(SMALL_DATASET - 1, "low", StrategyOptions(num_classes=2))
    result = rewrite(parse_net(CAFFENET), name, **dataclasses.asdict(options))
    assert result.frozen == ("conv1",)  # floor(5 / 3) of CaffeNet's 5 learnable layers


# --------------------------------------------------------------------------
# Property tests over generated chains


@st.composite
def chain_nets(draw):
    """Prototxt of a chain of conv/ip/relu/pool/BN/Scale layers (often a
    BatchNorm followed by a Scale, as in ResNet) ending in an
    InnerProduct head (maybe followed by ReLU/Dropout), a loss and maybe an Accuracy."""
    kinds = draw(st.lists(
        st.sampled_from(["conv", "ip", "relu", "pool", "bn", "scale", "dropout", "bnscale"]),
        min_size=1, max_size=10))
    kinds = [part for kind in kinds for part in (["bn", "scale"] if kind == "bnscale" else [kind])]
    lines = ['layer { name: "in" type: "Input" top: "data" top: "label" }']
    blob = "data"

    def param_specs() -> str:
        choice = draw(st.sampled_from(["none", "caffe", "frozen", "odd"]))
        return {
            "none": "",
            "caffe": "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }",
            "frozen": "param { lr_mult: 0 } param { lr_mult: 0 }",
            "odd": "param { lr_mult: 0.5 }",
        }[choice]

    for i, kind in enumerate(kinds + ["head"]):
        name = f"{kind}{i}"
        in_place = kind in ("relu", "bn", "scale", "dropout") and draw(st.booleans())
        top = blob if in_place else name
        body = {
            "conv": f'type: "Convolution" {param_specs()} convolution_param {{ num_output: 3 kernel_size: 1 }}',
            "ip": f'type: "InnerProduct" {param_specs()} inner_product_param {{ num_output: 3 }}',
            "head": f'type: "InnerProduct" {param_specs()} inner_product_param {{ num_output: 7 }}',
            "relu": 'type: "ReLU"',
            "pool": 'type: "Pooling" pooling_param { pool: MAX kernel_size: 1 }',
            "bn": 'type: "BatchNorm"' + (" batch_norm_param { use_global_stats: false }" if draw(st.booleans()) else ""),
            "scale": 'type: "Scale"' + (" scale_param { bias_term: true }" if draw(st.booleans()) else ""),
            "dropout": 'type: "Dropout"',
        }[kind]
        lines.append(f'layer {{ name: "{name}" {body} bottom: "{blob}" top: "{top}" }}')
        blob = top
    if draw(st.booleans()):
        lines.append(f'layer {{ name: "after" type: "ReLU" bottom: "{blob}" top: "{blob}" }}')
    lines.append(f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{blob}" bottom: "label" top: "loss" }}')
    if draw(st.booleans()):
        lines.append(f'layer {{ name: "acc" type: "Accuracy" bottom: "{blob}" bottom: "label" top: "acc" '
                     'include { phase: TEST } }')
    return "\n".join(lines)


PROPERTY = settings(max_examples=60, deadline=None)


def parse(text: str):
    """Like the ``parse_net`` fixture (hypothesis tests cannot take function-scoped fixtures)."""
    return prototext.to_message(prototext.parse(text.encode()), load_schema().new("NetParameter"))


def _masked(net, heads: Dict[str, str]):
    """``net`` without what a strategy may change: multipliers, BN settings,
    and the heads' names, blobs, class counts and fillers."""
    copy = type(net)()
    copy.CopyFrom(net)
    renamed = set(heads) | set(heads.values())
    for each in copy.layer:
        each.ClearField("param")
        each.ClearField("batch_norm_param")
        each.bottom[:] = ["HEAD" if b in renamed else b for b in each.bottom]
        each.top[:] = ["HEAD" if t in renamed else t for t in each.top]
        if each.name in renamed:
            each.name = "HEAD"
            each.ClearField("inner_product_param")
    return copy


def _learnable(net) -> List[str]:
    return [each.name for each in net.layer if graph.has_parameters(each)]


@PROPERTY
@given(text=chain_nets())
def test_property_last_fc_changes_only_heads_and_multipliers(text):
    original = parse(text)
    result = rewrite(original, num_classes=4)
    assert list(result.heads) == [n for n in names(original) if n.startswith("head")]
    assert _masked(result.net, result.heads) == _masked(original, result.heads)
    for each in result.net.layer:
        if each.name in result.heads.values():
            assert each.inner_product_param.num_output == 4
        elif graph.has_parameters(each):
            assert graph.lr_mults(each) == [0.0] * graph.param_blob_count(each)
        elif each.type == "BatchNorm":
            assert each.batch_norm_param.use_global_stats


@PROPERTY
@given(text=chain_nets(), data=st.data())
def test_property_top_train_last_freezes_exactly_the_first_layers(text, data):
    original = parse(text)
    learnable = _learnable(original)
    keep = data.draw(st.integers(1, len(learnable)))
    result = rewrite(original, "top", train_last=keep)
    net = result.net
    trained = [n for n in _learnable(net) if graph.is_learnable(layer(net, n))]
    frozen = [n for n in _learnable(net) if not graph.is_learnable(layer(net, n))]
    assert _learnable(net)[:len(frozen)] == frozen
    # exactly `keep` train, or more when the cut fell inside a BatchNorm's
    # Scale/Bias chain, which trains whole with its BatchNorm
    extra = learnable[len(frozen):len(learnable) - keep]
    assert all(layer(net, n).type in ("Scale", "Bias") for n in extra)
    assert len(trained) == keep + len(extra)
    assert [n for n in result.frozen if layer(net, n).type != "BatchNorm"] == frozen
    first_trained = graph.layer_index(net, trained[0])
    for index, each in enumerate(net.layer):
        if each.type == "BatchNorm" and each.name in result.frozen:
            assert index < first_trained and each.batch_norm_param.use_global_stats
        elif each.type == "BatchNorm":
            assert each.batch_norm_param == layer(original, each.name).batch_norm_param


@PROPERTY
@given(text=chain_nets(), data=st.data())
def test_property_top_freeze_until(text, data):
    original = parse(text)
    head = graph.find_heads(original).heads[0]
    cut = data.draw(st.integers(0, graph.layer_index(original, head) - 1))
    result = rewrite(original, "top", freeze_until=original.layer[cut].name)
    net = result.net
    sources = graph.producers(list(net.layer))
    for index, each in enumerate(net.layer):
        if not graph.param_blob_count(each) or each.name in result.heads.values():
            continue
        # a chain of Scale layers reading a BatchNorm at or before the cut is frozen with it
        source = index
        while net.layer[source].type == "Scale":
            source = sources[source][0]
        follows_frozen_bn = net.layer[source].type == "BatchNorm" and source <= cut and source != index
        assert (each.name in result.frozen) == (index <= cut or follows_frozen_bn)
        if each.type != "BatchNorm":
            assert graph.is_learnable(each) == (each.name not in result.frozen)


@PROPERTY
@given(text=chain_nets(), strategy=st.sampled_from(["last-fc", "full"]),
       lr=st.sampled_from([0.0, 0.001]))
def test_property_every_strategy_is_idempotent_and_checked(text, strategy, lr):
    rewrite(parse(text), strategy, frozen_lr_mult=lr)  # rewrite() asserts both


# --------------------------------------------------------------------------
# Real Caffe: the rewritten nets train, and only what should train changes

TRAINABLE = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "aux/fc" type: "InnerProduct" bottom: "conv1" top: "aux/fc"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "aux/classifier" type: "InnerProduct" bottom: "aux/fc" top: "aux/classifier"
  inner_product_param { num_output: 10 } }
layer { name: "aux/loss" type: "SoftmaxWithLoss" bottom: "aux/classifier" bottom: "label" top: "aux/loss"
  loss_weight: 0.3 }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "fc7" type: "InnerProduct" bottom: "conv2" top: "fc7"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }
"""

# Trains a few SGD steps in pycaffe (in a child process: Caffe aborts on bad
# nets) and prints which layers' blobs changed.
_TRAIN_SCRIPT = """
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
solver = caffe.SGDSolver(sys.argv[1])
before = {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()}
solver.step(3)
print(json.dumps({name: any(not np.array_equal(old, new.data) for old, new in zip(before[name], blobs))
                  for name, blobs in solver.net.params.items()}))
"""


# The siamese net with random data and weights (so that every layer gets gradients).
TRAINABLE_SIAMESE = SIAMESE.replace(
    'layer { name: "pair" type: "Input" top: "pair" top: "label"\n'
    '  input_param { shape { dim: 2 dim: 2 dim: 8 dim: 8 } shape { dim: 2 } } }',
    'layer { name: "pair" type: "DummyData" top: "pair" top: "label" dummy_data_param {'
    ' shape { dim: 2 dim: 2 dim: 8 dim: 8 } shape { dim: 2 }'
    ' data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }',
).replace("num_output: 4 kernel_size: 3", 'num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }'
).replace("num_output: 8 }", 'num_output: 8 weight_filler { type: "gaussian" std: 0.3 } }')


@pytest.mark.caffe
@pytest.mark.parametrize(
    "text, strategy, fields, trained",
    [
        (TRAINABLE, "last-fc", {}, {"fc8_ft"}),
        (TRAINABLE, "top", {"freeze_until": "scale1"}, {"conv2", "bn2", "scale2", "fc7", "fc8_ft"}),
        (TRAINABLE, "top", {"train_last": 2}, {"fc7", "fc8_ft"}),
        (TRAINABLE, "full", {"frozen_lr_mult": 0.5}, {
            "conv1", "bn1", "scale1", "conv2", "bn2", "scale2", "fc7", "fc8_ft", "aux/fc", "aux/classifier_ft"}),
        # conv1 frozen, so its twin conv1_p too (Caffe aborts on mismatched shared multipliers)
        (TRAINABLE_SIAMESE, "top", {"freeze_until": "conv1"}, {"ip1", "ip1_p", "cls_ft", "cls_p_ft"}),
    ],
)
def test_caffe_trains_exactly_the_unfrozen_layers(tmp_path, text, strategy, fields, trained):
    import json
    import os
    import subprocess
    import sys

    assert "DummyData" in text
    result = rewrite(parse(text), strategy, num_classes=3, **fields)
    net_path = tmp_path / "train_val.prototxt"
    net_path.write_text(prototext.print_message(result.net))
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(
        f'net: "{net_path}" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01 '
        f'max_iter: 3 solver_mode: CPU snapshot_after_train: false snapshot_prefix: "{tmp_path}/s"\n'
    )
    run = subprocess.run(
        [sys.executable, "-c", _TRAIN_SCRIPT, str(solver_path)],
        capture_output=True, text=True, env={**os.environ, "GLOG_minloglevel": "2"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    changed = json.loads(run.stdout.strip().splitlines()[-1])
    assert {name for name, moved in changed.items() if moved} == trained
    assert set(changed) - trained == {name for name in result.frozen}


def test_long_layer_lists_show_where_they_start_and_end(parse_net):
    """A frozen trunk of many layers is named by its first and last layers and
    a count, not by every one of them on a single line."""
    convs = "".join(
        f'layer {{ name: "c{i}" type: "Convolution" bottom: "{"data" if i == 0 else f"c{i - 1}"}" top: "c{i}" '
        'convolution_param { num_output: 4 kernel_size: 1 } }\n' for i in range(12))
    net = parse_net('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n' + convs
                    + 'layer { name: "fc" type: "InnerProduct" bottom: "c11" top: "fc" '
                    'inner_product_param { num_output: 10 } }\n'
                    'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    note = next(note for note in rewrite(net, "last-fc").notes if note.startswith("froze "))
    assert note == "froze 12 layer(s): c0, c1, c2, c3, ..., c8, c9, c10, c11 (12 in all) (lr_mult 0, decay_mult 0)"
