"""Graph queries (caffe_ft.net.graph): heads, parameter blobs, walks, sharing, the checker."""

from __future__ import annotations

import pytest

from netcheck import check_net
from caffe_ft.net import graph
from caffe_ft.errors import CaffeFtError

from ft_nets import CAFFENET, CAFFENET_DEPLOY, GOOGLENET, RESNET, SIAMESE, SQUEEZENET


def _index(net, name):
    return graph.layer_index(net, name)


# --------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize(
    "text, heads",
    [
        (CAFFENET, ("fc8",)),
        (CAFFENET_DEPLOY, ("fc8",)),
        (GOOGLENET, ("loss1/classifier", "loss2/classifier", "loss3/classifier")),
        (SQUEEZENET, ("conv10",)),
        (RESNET, ("fc1000",)),
        (SIAMESE, ("cls", "cls_p")),
    ],
)
def test_find_heads(parse_net, text, heads):
    search = graph.find_heads(parse_net(text))
    assert search.heads == heads
    assert search.blocked == ()


def test_find_heads_reports_a_scale_before_the_loss(parse_net):
    net = parse_net(
        """
        layer { name: "in" type: "Input" top: "x" top: "label" }
        layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3 } }
        layer { name: "temp" type: "Scale" bottom: "fc" top: "fc" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
        """
    )
    search = graph.find_heads(net)
    assert search.heads == ()
    assert search.blocked == ("temp",)


def test_head_candidates_are_the_last_layers_with_parameters(parse_net):
    net = parse_net(RESNET)
    assert graph.head_candidates(net, 3) == (
        "res2a_branch2a (Convolution)", "scale_res2a_branch2a (Scale)", "fc1000 (InnerProduct)",
    )


# --------------------------------------------------------------------------
# Parameter blobs


@pytest.mark.parametrize(
    "layer, count, biases",
    [
        ('type: "Convolution"', 2, {1}),
        ('type: "Convolution" convolution_param { bias_term: false }', 1, set()),
        ('type: "InnerProduct"', 2, {1}),
        ('type: "Scale" bottom: "x"', 1, set()),
        ('type: "Scale" bottom: "x" scale_param { bias_term: true }', 2, {1}),
        ('type: "Scale" bottom: "x" bottom: "y" scale_param { bias_term: true }', 1, {0}),
        ('type: "Bias" bottom: "x"', 1, {0}),
        ('type: "BatchNorm"', 3, set()),
        ('type: "PReLU"', 1, set()),
        ('type: "Parameter"', 1, set()),
        ('type: "ReLU"', 0, set()),
    ],
)
def test_param_blobs(parse_net, layer, count, biases):
    spec = parse_net(f'name: "l" {layer}', "LayerParameter")
    assert graph.param_blob_count(spec) == count
    assert graph.bias_blobs(spec) == biases
    assert graph.has_parameters(spec) == (count > 0 and spec.type != "BatchNorm")


@pytest.mark.parametrize("kind, plain, static", [("LSTM", 3, 4), ("RNN", 5, 6)])
def test_a_recurrent_layer_with_a_static_input_has_its_weights_counted(parse_net, kind, plain, static):
    # As many blobs as its fillers and its shapes say: freezing it must freeze the static input's weights too.
    from caffe_ft.net.fillers import layer_fillers

    for bottoms, count in (('bottom: "x" bottom: "c"', plain), ('bottom: "x" bottom: "c" bottom: "s"', static)):
        spec = parse_net(f'name: "r" type: "{kind}" {bottoms} recurrent_param {{ num_output: 2 }} '
                         'param { lr_mult: 0 }', "LayerParameter")
        assert graph.param_blob_count(spec) == count == len(layer_fillers(spec))
        assert graph.lr_mults(spec) == [0.0] + [1.0] * (count - 1)


def test_lr_mults_default_to_one_and_batch_norm_to_zero(parse_net):
    conv = parse_net('name: "c" type: "Convolution" param { lr_mult: 0 }', "LayerParameter")
    bn = parse_net('name: "b" type: "BatchNorm"', "LayerParameter")
    assert graph.lr_mults(conv) == [0.0, 1.0]
    assert graph.lr_mults(bn) == [0.0, 0.0, 0.0]
    assert graph.is_learnable(conv) and not graph.is_learnable(bn)


def test_loss_weight(parse_net):
    def weight(text: str) -> float:
        return graph.loss_weight(parse_net(f'name: "l" {text}', "LayerParameter"))

    assert weight('type: "SoftmaxWithLoss"') == 1
    assert weight('type: "SoftmaxWithLoss" loss_weight: 0.3') == pytest.approx(0.3)
    assert weight('type: "Accuracy"') == 0
    assert weight('type: "InnerProduct" loss_weight: 2') == 2


# --------------------------------------------------------------------------
# Walks


def test_producers_and_consumers_follow_in_place_layers(parse_net):
    net = parse_net(SQUEEZENET)
    layers = list(net.layer)
    conv10, relu, pool = (_index(net, n) for n in ("conv10", "relu_conv10", "pool10"))
    assert graph.producers(layers)[pool] == [relu]
    assert graph.consumers(layers)[conv10] == [relu]
    assert graph.consumers(layers)[relu] == [pool]


def test_downstream_and_upstream(parse_net):
    net = parse_net(GOOGLENET)
    layers = list(net.layer)
    classifier = _index(net, "loss1/classifier")
    below = {layers[i].name for i in graph.downstream(layers, [classifier])}
    assert below == {"loss1/classifier", "loss1/loss", "loss1/top-1"}
    above = {layers[i].name for i in graph.upstream(layers, [_index(net, "loss1/conv")])}
    assert above == {"loss1/conv", "loss1/ave_pool", "inception_4a/output", "inception_4a/1x1",
                     "inception_4a/3x3", "pool1/3x3_s2", "conv1/7x7_s2", "data"}


def test_exclusive_branch_stops_at_the_trunk(parse_net):
    net = parse_net(GOOGLENET)
    layers = list(net.layer)
    seed = graph.downstream(layers, [_index(net, "loss2/classifier")])
    branch = {layers[i].name for i in graph.exclusive_branch(layers, seed)}
    assert branch == {f"loss2/{n}" for n in (
        "ave_pool", "conv", "relu_conv", "fc", "relu_fc", "drop_fc", "classifier", "loss", "top-1")}


def test_sharing_groups(parse_net):
    net = parse_net(SIAMESE)
    groups = [{net.layer[i].name for i in group} for group in graph.sharing_groups(list(net.layer))]
    assert sorted(groups, key=sorted) == [{"cls", "cls_p"}, {"conv1", "conv1_p"}, {"ip1", "ip1_p"}]
    assert graph.sharing_groups(list(parse_net(CAFFENET).layer)) == []


def test_layer_index_suggests_close_names(parse_net):
    net = parse_net(CAFFENET)
    assert net.layer[graph.layer_index(net, "fc7")].name == "fc7"
    assert graph.layer_index(net, "data") == 0  # the first of the per-phase pair
    with pytest.raises(CaffeFtError, match="did you mean 'fc7'"):
        graph.layer_index(net, "fc_7")


# --------------------------------------------------------------------------
# The checker


@pytest.mark.parametrize("text", [CAFFENET, CAFFENET_DEPLOY, GOOGLENET, SQUEEZENET, RESNET, SIAMESE])
def test_check_net_accepts_the_sample_nets(parse_net, text):
    assert check_net(parse_net(text)) == []


def test_check_net_accepts_net_inputs(parse_net):
    net = parse_net('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    assert check_net(net) == []


@pytest.mark.parametrize(
    "text, problem",
    [
        ('layer { name: "a" type: "Input" top: "x" } layer { name: "a" type: "ReLU" bottom: "x" top: "x" }',
         "TRAIN: two layers are named 'a'"),
        ('layer { name: "r" type: "ReLU" bottom: "x" top: "y" }',
         "TRAIN: layer 'r': bottom 'x' is not produced by an earlier layer"),
        ('layer { name: "r" type: "ReLU" bottom: "x" top: "y" } layer { name: "in" type: "Input" top: "x" }',
         "TEST: layer 'r': bottom 'x' is not produced by an earlier layer"),
        ('layer { name: "in" type: "Input" top: "x" include { phase: TEST } }'
         'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }',
         "TRAIN: layer 'r': bottom 'x' is not produced by an earlier layer"),
        ('layer { name: "in" type: "Input" top: "x" }'
         'layer { name: "c" type: "Convolution" bottom: "x" top: "c" param {} param {} param {}'
         ' convolution_param { num_output: 2 } }',
         "layer 'c': 3 param entries for 2 parameter blob(s)"),
        ('layer { name: "in" type: "Input" top: "x" }'
         'layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" }',
         "layer 'f': num_output must be at least 1"),
        ('layer { name: "in" type: "Input" top: "x" }'
         'layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" param { name: "w" lr_mult: 0 }'
         ' inner_product_param { num_output: 2 } }'
         'layer { name: "g" type: "InnerProduct" bottom: "x" top: "g" param { name: "w" lr_mult: 1 }'
         ' inner_product_param { num_output: 2 } }',
         "shared parameter 'w': lr_mult 1 in layer 'g' but 0 in layer 'f'"),
        ('layer { name: "in" type: "Input" top: "x" include { phase: TRAIN } exclude { phase: TEST } }',
         "specify either include rules or exclude rules"),
    ],
)
def test_check_net_finds_problems(parse_net, text, problem):
    problems = check_net(parse_net(text))
    assert any(problem in p for p in problems), problems


def test_check_net_allows_the_same_name_in_different_phases(parse_net):
    # CAFFENET has a "data" layer per phase; a TEST-only duplicate of "loss" is fine too
    net = parse_net(CAFFENET)
    loss = net.layer[-1]
    net.layer.add().CopyFrom(loss)
    net.layer[-1].include.add().phase = 1  # TEST
    net.layer[-2].include.add().phase = 0  # TRAIN
    assert [layer.name for layer in net.layer[-2:]] == ["loss", "loss"]
    assert check_net(net) == []


def test_check_net_ignores_param_counts_of_python_layers(parse_net):
    net = parse_net('layer { name: "p" type: "Python" top: "x" param { lr_mult: 1 } }')
    assert check_net(net) == []
