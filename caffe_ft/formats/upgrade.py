"""Upgrade legacy Caffe nets and solvers to the current format, as Caffe 1.0 does.

Caffe reads old files through ``UpgradeNetAsNeeded`` / ``UpgradeSolverAsNeeded``
(``src/caffe/util/upgrade_proto.cpp``); its tools ``upgrade_net_proto_text`` and
``upgrade_solver_proto_text`` run the same functions and print the result.
This module does the same on caffe-ft's own messages, step by step and in
Caffe's order, so that ``print_message`` of an upgraded message is byte for
byte what the tools write:

1. V0 → V1 (``layers { layer { type: "conv" ... } }``): padding layers are
   folded into the conv/pool layer they feed, V0 fields move to the per-type
   parameter messages.  Like Caffe, this step keeps only the net's ``name``,
   ``layers``, ``input``, ``input_dim`` and ``force_backward``.
2. Data transformation: ``scale``/``mean_file``/``crop_size``/``mirror`` of
   V1 Data, ImageData and WindowData layers move to ``transform_param``.
3. V1 → current (``layers { type: CONVOLUTION }`` → ``layer { type: "Convolution" }``,
   ``blobs_lr``/``weight_decay``/``param``/``blob_share_mode`` → ``param {}``).
4. ``input``/``input_shape``/``input_dim`` → one ``Input`` layer, placed first.
5. BatchNorm layers with the three ``param`` entries of the old definition
   get ``lr_mult: 0`` and ``decay_mult: 0`` on each of them.

(The net tool then runs step 2 once more when the input needed it; by then
the net has no V1 layers left, so that pass never changes anything.)

Where Caffe aborts (``LOG(FATAL)``/``CHECK``) we raise :class:`CaffeFtError`;
where it logs an error and carries on, we carry on identically and add a
``"warning: ..."`` note.

Caffemodels go through the same functions.  Because V0 padding layers
disappear and an ``Input`` layer may appear, :func:`upgrade_net_with_map`
also says where each upgraded layer came from: ``index_map[new] = old`` (or
``None`` for a layer the upgrade created), where ``old`` indexes the
original ``layers`` list if the net had one, else its ``layer`` list.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, cast

from google.protobuf.message import Message

from ..errors import CaffeFtError
from .schema import is_repeated
from .wire import key_bytes, text, varint_bytes

IndexMap = List[Optional[int]]

# --- V0 → V1 --------------------------------------------------------------

# V0 type string → V1LayerParameter.LayerType name (UpgradeV0LayerType).
V0_LAYER_TYPES: Dict[str, str] = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

# V0 field → {V0 type: where it goes in the V1 layer, as a dotted path}.  A V0
# field set on a layer whose type is not listed is dropped, and Caffe reports it.
_V0_TYPED_FIELDS: Dict[str, Dict[str, str]] = {
    "num_output": {
        "conv": "convolution_param.num_output",
        "innerproduct": "inner_product_param.num_output",
    },
    "biasterm": {
        "conv": "convolution_param.bias_term",
        "innerproduct": "inner_product_param.bias_term",
    },
    "weight_filler": {
        "conv": "convolution_param.weight_filler",
        "innerproduct": "inner_product_param.weight_filler",
    },
    "bias_filler": {
        "conv": "convolution_param.bias_filler",
        "innerproduct": "inner_product_param.bias_filler",
    },
    "pad": {"conv": "convolution_param.pad", "pool": "pooling_param.pad"},
    "kernelsize": {
        "conv": "convolution_param.kernel_size",
        "pool": "pooling_param.kernel_size",
    },
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {
        "data": "data_param.source",
        "hdf5_data": "hdf5_data_param.source",
        "images": "image_data_param.source",
        "window_data": "window_data_param.source",
        "infogain_loss": "infogain_loss_param.source",
    },
    "batchsize": {
        "data": "data_param.batch_size",
        "hdf5_data": "hdf5_data_param.batch_size",
        "images": "image_data_param.batch_size",
        "window_data": "window_data_param.batch_size",
    },
    "rand_skip": {
        "data": "data_param.rand_skip",
        "images": "image_data_param.rand_skip",
    },
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}

# V0 fields that go to transform_param whatever the layer type.
_V0_TRANSFORM_FIELDS: Dict[str, str] = {
    "scale": "transform_param.scale",
    "meanfile": "transform_param.mean_file",
    "cropsize": "transform_param.crop_size",
    "mirror": "transform_param.mirror",
}

# --- data transformation ----------------------------------------------------

# V1 data layer type → its parameter message holding legacy transform fields.
_DATA_LAYER_PARAMS: Dict[str, str] = {
    "DATA": "data_param",
    "IMAGE_DATA": "image_data_param",
    "WINDOW_DATA": "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

# --- V1 → current -------------------------------------------------------------

# V1LayerParameter.LayerType name → LayerParameter type (UpgradeV1LayerType).
V1_LAYER_TYPES: Dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# Parameter messages UpgradeV1LayerParameter copies, same name on both sides.
_V1_COPIED_PARAMS = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
    "convolution_param", "data_param", "dropout_param", "dummy_data_param",
    "eltwise_param", "exp_param", "hdf5_data_param", "hdf5_output_param",
    "hinge_loss_param", "image_data_param", "infogain_loss_param",
    "inner_product_param", "lrn_param", "memory_data_param", "mvn_param",
    "pooling_param", "power_param", "relu_param", "sigmoid_param",
    "softmax_param", "slice_param", "tanh_param", "threshold_param",
    "window_data_param", "transform_param", "loss_param",
)

# --- solver -------------------------------------------------------------------

# SolverParameter.SolverType name → SolverParameter.type (UpgradeSolverType).
SOLVER_TYPES: Dict[str, str] = {
    "SGD": "SGD",
    "NESTEROV": "Nesterov",
    "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta",
    "ADAM": "Adam",
}


# =============================================================================
# helpers
# =============================================================================


def _enum_name(message: Message, field: str) -> str:
    """The symbolic name of enum field ``field``'s current value."""
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    value = getattr(message, field)
    enum_value = descriptor.enum_type.values_by_number.get(value)
    return enum_value.name if enum_value is not None else str(value)


def _set_enum_by_name(message: Message, field: str, name: str) -> None:
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    setattr(message, field, descriptor.enum_type.values_by_name[name].number)


def _store(layer: Message, path: str, source: Message, source_field: str) -> None:
    """Copy ``source.source_field`` to ``path`` (``"pooling_param.pad"``) under ``layer``.

    A repeated target gets the value appended, a message target a copy.
    """
    *parents, field = path.split(".")
    target = layer
    for parent in parents:
        target = getattr(target, parent)
    descriptor = target.DESCRIPTOR.fields_by_name[field]
    value = getattr(source, source_field)
    if descriptor.message_type is not None:
        getattr(target, field).CopyFrom(value)
    elif descriptor.enum_type is not None:
        _set_enum_by_name(target, field, _enum_name(source, source_field))
    elif is_repeated(descriptor):
        getattr(target, field).append(value)
    else:
        setattr(target, field, value)


def _layer_label(layer: Message, index: Optional[int]) -> str:
    name = layer.name or (layer.layer.name if layer.DESCRIPTOR.name == "V1LayerParameter" else "")
    return text(name) or f"#{index}"  # bytes where the file's string is not UTF-8


# =============================================================================
# what needs upgrading
# =============================================================================


def needs_v0_upgrade(net: Message) -> bool:
    """Some ``layers`` entry still wraps a V0 ``layer`` (NetNeedsV0ToV1Upgrade)."""
    return any(entry.HasField("layer") for entry in net.layers)


def needs_data_upgrade(net: Message) -> bool:
    """A V1 data layer still carries transformation fields (NetNeedsDataUpgrade)."""
    return any(_legacy_transform_fields(entry) for entry in net.layers)


def needs_v1_upgrade(net: Message) -> bool:
    """The net still uses ``layers`` (NetNeedsV1ToV2Upgrade)."""
    return len(net.layers) > 0


def needs_input_upgrade(net: Message) -> bool:
    """The net declares ``input`` fields (NetNeedsInputUpgrade)."""
    return len(net.input) > 0


def needs_batch_norm_upgrade(net: Message) -> bool:
    """A BatchNorm layer lists exactly three ``param`` (NetNeedsBatchNormUpgrade)."""
    return any(_is_old_batch_norm(layer) for layer in net.layer)


def net_needs_upgrade(net: Message) -> bool:
    """Whether Caffe considers ``net`` outdated (NetNeedsUpgrade).

    Like Caffe's, this stays true for a BatchNorm layer with three ``param``
    even once upgraded; :func:`upgrade_net` then returns no notes.
    """
    return (
        needs_v0_upgrade(net)
        or needs_v1_upgrade(net)
        or needs_data_upgrade(net)
        or needs_input_upgrade(net)
        or needs_batch_norm_upgrade(net)
    )


def _legacy_transform_fields(entry: Message) -> List[str]:
    if not entry.HasField("type"):
        return []
    param_name = _DATA_LAYER_PARAMS.get(_enum_name(entry, "type"))
    if param_name is None:
        return []
    params = getattr(entry, param_name)
    return [field for field in _TRANSFORM_FIELDS if params.HasField(field)]


def _is_old_batch_norm(layer: Message) -> bool:
    return layer.type == "BatchNorm" and len(layer.param) == 3


# =============================================================================
# the steps
# =============================================================================


def _fold_padding_layers(net: Message, index_map: IndexMap) -> Tuple[List[Message], IndexMap, List[str]]:
    """UpgradeV0PaddingLayers: drop V0 padding layers, giving their pad to the consumer.

    Returns the kept ``layers`` entries (copies), their original indices and notes.
    """
    last_producer: Dict[str, int] = {name: -1 for name in net.input}
    kept: List[Message] = []
    kept_map: IndexMap = []
    notes: List[str] = []
    for i, entry in enumerate(net.layers):
        v0_type = entry.layer.type
        if v0_type != "padding":
            copy = type(entry)()
            copy.CopyFrom(entry)
            kept.append(copy)
            kept_map.append(index_map[i])
        for j, blob in enumerate(entry.bottom):
            if blob not in last_producer:
                raise CaffeFtError(
                    f"V0 upgrade: unknown bottom blob '{text(blob)}' (not produced by an earlier layer "
                    "nor a net input)",
                    layer=_layer_label(entry, i),
                )
            source_index = last_producer[blob]
            if source_index == -1:
                continue
            source = net.layers[source_index]
            if source.layer.type != "padding":
                continue
            label = _layer_label(entry, i)
            if v0_type not in ("conv", "pool"):
                raise CaffeFtError(
                    f"V0 upgrade: a padding layer feeds a layer of type '{text(v0_type)}'; "
                    "only conv and pool layers can absorb its padding",
                    layer=label,
                )
            if len(entry.bottom) != 1:
                raise CaffeFtError(
                    "V0 upgrade: a layer fed by a padding layer must have exactly one bottom",
                    layer=label,
                )
            if len(source.bottom) != 1 or len(source.top) != 1:
                raise CaffeFtError(
                    "V0 upgrade: a padding layer must have exactly one bottom and one top",
                    layer=_layer_label(source, source_index),
                )
            target = kept[-1]
            target.layer.pad = source.layer.pad
            target.bottom[j] = source.bottom[0]
            notes.append(
                f"V0 padding layer '{_layer_label(source, source_index)}' folded into "
                f"'{label}' (pad: {source.layer.pad})"
            )
        for blob in entry.top:
            last_producer[blob] = i
    return kept, kept_map, notes


def _set_string(message: Message, field: str, value: Any) -> None:
    """``message.field = value``, also for ``bytes`` that are not UTF-8 (what
    protobuf hands back for such a string; Caffe keeps them, and protobuf 3.12
    refuses to assign them), which go in as a wire record."""
    if isinstance(value, bytes):
        number = message.DESCRIPTOR.fields_by_name[field].number
        message.MergeFromString(key_bytes(number, 2) + varint_bytes(len(value)) + value)
    else:
        setattr(message, field, value)


def _extend_strings(message: Message, field: str, values: Any) -> None:
    """``message.field.extend(values)``, also for ``bytes`` that are not UTF-8."""
    for value in values:
        if isinstance(value, bytes):
            _set_string(message, field, value)  # a record of a repeated field appends
        else:
            getattr(message, field).append(value)


def _v0_to_v1_layer(entry: Message, out: Message, label: str) -> List[str]:
    """UpgradeV0LayerParameter: one ``layers { layer { ... } }`` → V1 fields."""
    out.Clear()
    _extend_strings(out, "bottom", entry.bottom)
    _extend_strings(out, "top", entry.top)
    if not entry.HasField("layer"):
        return []
    v0 = entry.layer
    if v0.HasField("name"):
        _set_string(out, "name", v0.name)
    if v0.HasField("type"):
        v1_type = V0_LAYER_TYPES.get(v0.type)
        if v1_type is None:
            raise CaffeFtError(f"V0 upgrade: unknown V0 layer type '{text(v0.type)}'", layer=label)
        _set_enum_by_name(out, "type", v1_type)
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    warnings = []
    for field, targets in _V0_TYPED_FIELDS.items():
        if not v0.HasField(field):
            continue
        target = targets.get(v0.type)
        if target is None:
            warnings.append(
                f"warning: V0 upgrade dropped '{field}' of layer '{label}': "
                f"no such parameter for layer type '{text(v0.type)}'"
            )
            continue
        _store(out, target, v0, field)
    for field, target in _V0_TRANSFORM_FIELDS.items():
        if v0.HasField(field):
            _store(out, target, v0, field)
    return warnings


def _upgrade_v0(net: Message, index_map: IndexMap) -> Tuple[IndexMap, List[str]]:
    """UpgradeV0Net, in place.  Keeps only what Caffe keeps."""
    kept, kept_map, notes = _fold_padding_layers(net, index_map)
    dropped = [
        field.name
        for field, _ in net.ListFields()
        if field.name not in ("name", "layers", "input", "input_dim", "force_backward")
    ]
    name = net.name if net.HasField("name") else None
    inputs, input_dims = list(net.input), list(net.input_dim)
    force_backward = net.force_backward if net.HasField("force_backward") else None
    net.Clear()
    if name is not None:
        _set_string(net, "name", name)
    for entry, original_index in zip(kept, kept_map):
        notes.extend(_v0_to_v1_layer(entry, net.layers.add(), _layer_label(entry, original_index)))
    net.input.extend(inputs)
    net.input_dim.extend(input_dims)
    if force_backward is not None:
        net.force_backward = force_backward
    notes.insert(0, "V0LayerParameter -> V1LayerParameter")
    notes.extend(
        f"warning: V0 upgrade dropped the net's '{field}' field, as Caffe does" for field in dropped
    )
    return kept_map, notes


def _upgrade_data_transformation(net: Message) -> List[str]:
    """UpgradeNetDataTransformation, in place.

    Like Caffe, every V1 Data/ImageData/WindowData layer gets a (possibly empty)
    parameter message and ``transform_param``, even one with nothing to move.
    """
    notes = []
    for i, entry in enumerate(net.layers):
        if not entry.HasField("type"):
            continue
        param_name = _DATA_LAYER_PARAMS.get(_enum_name(entry, "type"))
        if param_name is None:
            continue
        params = getattr(entry, param_name)
        params.SetInParent()
        entry.transform_param.SetInParent()
        moved = []
        for field in _TRANSFORM_FIELDS:
            if params.HasField(field):
                setattr(entry.transform_param, field, getattr(params, field))
                params.ClearField(field)
                moved.append(field)
        if moved:
            notes.append(
                f"layer '{_layer_label(entry, i)}': {param_name} {', '.join(moved)} -> transform_param"
            )
    return notes


def _v1_to_current_layer(v1: Message, out: Message, label: str) -> None:
    """UpgradeV1LayerParameter: one V1 ``layers`` entry → a ``layer`` entry."""
    out.Clear()
    _extend_strings(out, "bottom", v1.bottom)
    _extend_strings(out, "top", v1.top)
    if v1.HasField("name"):
        _set_string(out, "name", v1.name)
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        type_name = _enum_name(v1, "type")
        if type_name not in V1_LAYER_TYPES:
            raise CaffeFtError(f"V1 upgrade: unknown V1 layer type {type_name}", layer=label)
        out.type = V1_LAYER_TYPES[type_name]
    out.blobs.extend(v1.blobs)

    def param(i: int) -> Message:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        _set_string(param(i), "name", name)
    share_modes = v1.DESCRIPTOR.fields_by_name["blob_share_mode"].enum_type
    for i, mode in enumerate(v1.blob_share_mode):
        _set_enum_by_name(param(i), "share_mode", share_modes.values_by_number[mode].name)
    for i, lr in enumerate(v1.blobs_lr):
        param(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for field in _V1_COPIED_PARAMS:
        if v1.HasField(field):
            getattr(out, field).CopyFrom(getattr(v1, field))


def _upgrade_v1(net: Message) -> List[str]:
    """UpgradeV1Net, in place: ``layers`` → ``layer``."""
    if len(net.layer) > 0:
        raise CaffeFtError(
            "the net has both 'layer' and legacy 'layers' entries; Caffe refuses to upgrade "
            "such a mix: convert the 'layers' entries to 'layer' by hand"
        )
    v1_layers = [type(entry)() for entry in net.layers]
    for copy, entry in zip(v1_layers, net.layers):
        copy.CopyFrom(entry)
    net.ClearField("layers")
    for i, v1 in enumerate(v1_layers):
        _v1_to_current_layer(v1, net.layer.add(), _layer_label(v1, i))
    return [f"V1LayerParameter -> LayerParameter ({len(v1_layers)} layers)"]


def _upgrade_input(net: Message, index_map: IndexMap) -> Tuple[IndexMap, List[str]]:
    """UpgradeNetInput, in place: net inputs become one ``Input`` layer, first."""
    inputs = list(net.input)
    has_shape, has_dim = len(net.input_shape) > 0, len(net.input_dim) > 0
    notes = []
    if has_shape or has_dim:
        if has_shape and len(net.input_shape) < len(inputs):
            raise CaffeFtError(
                f"{len(inputs)} inputs but only {len(net.input_shape)} input_shape entries"
            )
        if not has_shape and len(net.input_dim) < 4 * len(inputs):
            raise CaffeFtError(
                f"{len(inputs)} inputs need {4 * len(inputs)} input_dim values, "
                f"got {len(net.input_dim)}"
            )
        layer = net.layer.add()
        layer.name = "input"
        layer.type = "Input"
        input_param = layer.input_param
        input_param.SetInParent()
        for i, blob in enumerate(inputs):
            _extend_strings(layer, "top", [blob])
            shape = input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        # Move the new layer (last) to the front, keeping the others' order.
        layers = [type(layer)() for _ in net.layer]
        for copy, original in zip(layers, net.layer):
            copy.CopyFrom(original)
        net.ClearField("layer")
        net.layer.extend(layers[-1:] + layers[:-1])
        index_map = [cast(Optional[int], None)] + index_map
        notes.append(f"input fields -> Input layer 'input' (tops: {', '.join(map(text, inputs))})")
    else:
        notes.append(f"input fields without shapes removed ({', '.join(map(text, inputs))})")
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    return index_map, notes


def _upgrade_batch_norm(net: Message) -> List[str]:
    """UpgradeNetBatchNorm, in place: zero the multipliers of old 3-param BatchNorms."""
    notes = []
    for i, layer in enumerate(net.layer):
        if not _is_old_batch_norm(layer):
            continue
        before = [spec.SerializeToString() for spec in layer.param]
        for spec in layer.param:
            spec.lr_mult = 0.0
            spec.decay_mult = 0.0
        if [spec.SerializeToString() for spec in layer.param] != before:
            notes.append(f"BatchNorm '{_layer_label(layer, i)}': lr_mult and decay_mult set to 0")
    return notes


# =============================================================================
# public API
# =============================================================================


def upgrade_net_with_map(net: Message) -> Tuple[List[str], IndexMap]:
    """Upgrade ``net`` in place like Caffe; return notes and where each layer came from.

    ``index_map[new_index]`` is the layer's index in the original ``layers``
    list (if the net had V0/V1 ``layers``) or ``layer`` list (otherwise), or
    ``None`` for the ``Input`` layer made from ``input`` fields.  A caller
    that keeps per-layer data beside the net (a caffemodel's blobs) re-aligns
    it with this map.
    """
    source = net.layers if len(net.layers) > 0 else net.layer
    index_map: IndexMap = list(range(len(source)))
    notes: List[str] = []
    if needs_v0_upgrade(net):
        index_map, step_notes = _upgrade_v0(net, index_map)
        notes.extend(step_notes)
    if needs_data_upgrade(net):
        notes.extend(_upgrade_data_transformation(net))
    if needs_v1_upgrade(net):
        notes.extend(_upgrade_v1(net))
    if needs_input_upgrade(net):
        index_map, step_notes = _upgrade_input(net, index_map)
        notes.extend(step_notes)
    if needs_batch_norm_upgrade(net):
        notes.extend(_upgrade_batch_norm(net))
    return notes, index_map


def upgrade_net(net: Message) -> List[str]:
    """Upgrade ``net`` in place as Caffe 1.0 does; return what changed (empty: nothing did)."""
    notes, _ = upgrade_net_with_map(net)
    return notes


def solver_needs_upgrade(solver: Message) -> bool:
    """The solver uses the deprecated ``solver_type`` enum (SolverNeedsTypeUpgrade)."""
    return solver.HasField("solver_type")


def upgrade_solver(solver: Message) -> List[str]:
    """Upgrade ``solver`` in place as Caffe 1.0 does (UpgradeSolverAsNeeded)."""
    if not solver_needs_upgrade(solver):
        return []
    if solver.HasField("type"):
        raise CaffeFtError(
            "the solver sets both the deprecated 'solver_type' and 'type'; "
            "Caffe refuses to upgrade it: keep only 'type'"
        )
    old = _enum_name(solver, "solver_type")
    if old not in SOLVER_TYPES:
        raise CaffeFtError(f"unknown solver_type {old}")
    solver.type = SOLVER_TYPES[old]
    solver.ClearField("solver_type")
    return [f"solver_type: {old} -> type: \"{SOLVER_TYPES[old]}\""]


def current_net(net: Message, path: str) -> Message:
    """``net`` in the current format (a legacy net is upgraded on a copy;
    an error names ``path``)."""
    if not net_needs_upgrade(net):
        return net
    copy = type(net)()
    copy.CopyFrom(net)
    try:
        upgrade_net(copy)
    except CaffeFtError as exc:
        raise exc.located(path) from None
    return copy
