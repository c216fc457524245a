"""``caffe-ft rewrite``: a pretrained net in, a fine-tuning setup out.

The steps, each a function over messages (no file access here):

1. apply a strategy (:mod:`caffe_ft.recipe.strategies`) to the net;
2. give it data layers from ``templates/`` when data was named (a deploy net
   gets data layers and a loss; a train_val net has its data layers' sources
   replaced, keeping their preprocessing);
3. derive the matching deploy net (same layers minus data, loss and
   accuracy; an Input layer; a Softmax per head);
4. rewrite the solver (:mod:`caffe_ft.recipe.solver`).

:func:`plan` returns every output file's text, written as an edit of its
input so that reviewers see only the lines that changed; the CLI writes them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, cast

from google.protobuf.message import Message

from ..net import graph
from . import strategies, templating
from ..formats import prototext
from ..errors import CaffeFtError
from ..formats.files import NET, SOLVER, TextFile
from ..formats.numbers import format_float
from ..formats.schema import Schema

if TYPE_CHECKING:
    from ..data.sources import DataSummary
    from .solver import Schedule

IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)
LOSS_SUFFIX = "Loss"
# Marks the solver values caffe-ft scaled, so a rerun scales the originals.
ORIGINALS_MARK = "# caffe-ft: scaled from"


@dataclass(frozen=True)
class DataOptions:
    """Where the fine-tuning data is and how to feed it (``--train-data`` …)."""

    train: Optional[str] = None
    val: Optional[str] = None
    batch_size: int = 32
    val_batch_size: int = 50
    crop_size: Optional[int] = None
    resize: Optional[int] = None
    mean_values: Tuple[float, ...] = ()
    mean_file: Optional[str] = None
    scale: Optional[float] = None
    mirror: Optional[bool] = None
    root_folder: Optional[str] = None
    channels: Optional[int] = None  # --gray (1) / --color (3): what the net's input gets


@dataclass(frozen=True)
class SolverOptions:
    """How the solver is rewritten: ``base_lr`` times ``lr_scale``; the run in
    ``epochs`` of the training data (default: by strategy and data size) or
    ``max_iter`` iterations; ``step_scale`` only where the data's size is unknown."""

    lr_scale: float = 0.1
    step_scale: float = 0.2
    max_iter: Optional[int] = None
    epochs: Optional[int] = None


class UnknownInputShape(CaffeFtError):
    """Nothing tells the size of the net's input (an LMDB net without crop, data or mean file)."""


@dataclass(frozen=True)
class Item:
    """What one example of the data is, as far as the files tell: ``shape``
    (C, H, W; None when unknown), where that came from, and each phase's data
    layer type (ImageData or Data) by what its source is."""

    shape: Optional[Tuple[int, int, int]] = None
    origin: str = ""
    kinds: Dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass
class RewritePlan:
    """What a rewrite writes: file name -> (text, the text it was edited from)."""

    outdir: str
    files: Dict[str, Tuple[str, Optional[str], Optional[str]]]  # name -> (text, input path, input text)
    summary: List[str]
    strategy: str
    heads: Dict[str, str]
    # The train net's input shapes where its data layers do not tell (no crop or resize): the data's.
    input_shapes: Dict[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # Binary files beside the nets: name -> BlobProto (--class-weights' InfogainLoss H matrix).
    blobs: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def paths(self) -> Dict[str, str]:
        return {name: os.path.join(self.outdir, name) for name in self.files}


# ---------------------------------------------------------------------------
# Net structure questions
# ---------------------------------------------------------------------------


def data_layers(net: Message) -> List[int]:
    """Indices of the layers that read data (not Input)."""
    return [i for i, layer in enumerate(net.layer) if layer.type in graph.DATA_TYPES and layer.type != "Input"]


def input_layers(net: Message) -> List[int]:
    return [i for i, layer in enumerate(net.layer) if layer.type == "Input"]


def is_deploy(net: Message) -> bool:
    """A deploy net has no data layers and no loss."""
    return not data_layers(net) and not any(layer.type.endswith(LOSS_SUFFIX) for layer in net.layer)


def _phase_name(layer: Message) -> Optional[str]:
    for rule in layer.include:
        if rule.HasField("phase"):
            return "TRAIN" if rule.phase == 0 else "TEST"
    return None


def _head_scores(net: Message, heads: Sequence[str]) -> List[Tuple[List[int], str]]:
    """For each head, the sink layers its scores reach (through parameter-free
    layers) and the blob carrying its scores (:func:`graph.head_outputs`)."""
    layers = list(net.layer)
    return [graph.head_outputs(layers, graph.layer_index(net, name)) for name in heads]


# ---------------------------------------------------------------------------
# Data layers
# ---------------------------------------------------------------------------


def _source_kind(source: str) -> str:
    if os.path.isdir(source):
        return "Data"
    return "ImageData"


def _transform_items(transform: Message) -> List[Tuple[str, str]]:
    items = []
    for field, values in prototext.message_fields(transform):
        for value in values:
            items.append((field.name, prototext.format_value(field, value)))
    return items


def _transform(
    schema: Schema, original: Optional[Message], data: DataOptions, train: bool, crop: Optional[int],
    channels: Optional[int] = None,
) -> Message:
    """The transform_param of a new data layer: the original's, else ImageNet-style
    defaults (the BGR mean only for colour input: Caffe aborts on 3 means for 1 channel)."""
    transform = schema.new("TransformationParameter")
    if original is not None:
        transform.CopyFrom(original)
    else:
        if crop:
            transform.crop_size = crop
        if channels in (None, 3):
            transform.mean_value.extend(IMAGENET_MEAN_BGR)
        if train:
            transform.mirror = True
    if data.crop_size is not None:
        transform.crop_size = data.crop_size
    if data.mean_values:
        transform.ClearField("mean_file")
        del transform.mean_value[:]
        transform.mean_value.extend(data.mean_values)
    if data.mean_file:
        del transform.mean_value[:]
        transform.mean_file = data.mean_file
    if data.scale is not None:
        transform.scale = data.scale
    if data.mirror is not None and train:
        transform.mirror = data.mirror
    return transform


def _render_layers(schema: Schema, template: str, **context: object) -> List[Message]:
    text = templating.render(template, **context)
    fragment = prototext.to_message(prototext.parse(text.encode(), template), schema.new(NET), template)
    return list(fragment.layer)


def _input_layer(schema: Schema, name: str, top: str, shape: Sequence[int]) -> Message:
    """The Input layer a deploy net has instead of its data layers."""
    layer = schema.new("LayerParameter")
    layer.name, layer.type = name, "Input"
    layer.top.append(top)
    layer.input_param.shape.add().dim.extend(shape)
    return layer


def _softmax_layer(schema: Schema, name: str, scores: str) -> Message:
    """The Softmax a deploy net has on a head whose loss it lost (built here, not from
    a template: a rewrite without data renders no template, and jinja2's import
    would be a tenth of its run)."""
    layer = schema.new("LayerParameter")
    layer.name, layer.type = name, "Softmax"
    layer.bottom.append(scores)
    layer.top.append(name)
    return layer


def _default_resize(size: int) -> int:
    """ImageNet-style: resize to 256 and crop large inputs, resize small ones to fit."""
    return max(256, size) if size >= 200 else size


def _new_data_layers(
    schema: Schema,
    data: DataOptions,
    name: str,
    tops: Tuple[str, str],
    originals: Sequence[Message],
    input_shape: Optional[Sequence[int]] = None,
    item: Optional[Item] = None,
) -> List[Message]:
    """TRAIN and TEST data layers reading ``data`` (its paths as the written
    file names them, its ``kinds`` as the sources are).

    ``originals`` are the data layers being replaced (their preprocessing is
    kept); a deploy net has none and gives its ``input_shape`` instead.
    ``item``: what one example of the data is (for grey or colour input).
    """
    assert data.train and data.val
    by_phase = {_phase_name(layer): layer for layer in originals}
    first = originals[0] if originals else None
    deploy_channels = input_shape[1] if input_shape is not None and len(input_shape) == 4 else None
    size: Optional[int]
    if input_shape is not None and deploy_channels is not None:
        size = input_shape[2]
    else:
        size = (first.transform_param.crop_size if first is not None else 0) or None
    old_resize = first.image_data_param.new_height if first is not None and first.HasField("image_data_param") else 0
    resize = data.resize or old_resize or (_default_resize(size) if size else None)
    crop = data.crop_size or size
    crop_needed = crop if resize and crop and resize > crop else None
    phases = []
    transforms = []
    for phase, source, batch in (("TRAIN", data.train, data.batch_size), ("TEST", data.val, data.val_batch_size)):
        original = by_phase.get(phase) or by_phase.get(None)
        # A replaced layer's preprocessing is kept, none included; only new data from a
        # deploy net gets ImageNet-style defaults.
        transform = _transform(schema, original.transform_param if original is not None else None,
                               data, phase == "TRAIN", crop_needed, deploy_channels)
        transforms.append(transform)
        phases.append({
            "name": phase,
            "type": item.kinds[phase] if item is not None and phase in item.kinds else _source_kind(source),
            "source": source,
            "batch_size": batch,
            "shuffle": phase == "TRAIN",
            "transform": _transform_items(transform),
        })
    return _render_layers(
        schema, "data_layers.prototxt.j2", phases=phases, name=name, data_top=tops[0], label_top=tops[1],
        new_size=resize, is_color=_channels(first, deploy_channels, transforms[0], data, item) != 1,
        root_folder=data.root_folder,
    )


def _channels(first: Optional[Message], deploy_channels: Optional[int], transform: Message,
              data: DataOptions, item: Optional[Item] = None) -> int:
    """Channels the new data layers must give: ``--gray``/``--color``, the deploy
    input's, the replaced ImageData's colour setting, what the data's first
    example is (its image's header, its Datum); else a single mean value means
    grey, lest a grey net (LeNet) get colour images its weights do not fit."""
    if data.channels is not None:
        return data.channels
    if deploy_channels is not None:
        return deploy_channels
    if first is not None and first.HasField("image_data_param"):
        return 3 if first.image_data_param.is_color else 1
    if item is not None and item.shape is not None:
        return item.shape[0]
    return 1 if len(transform.mean_value) == 1 else 3


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


def _replace_layers(net: Message, remove: Sequence[int], insert_at: int, new_layers: Sequence[Message]) -> None:
    """Remove the layers at ``remove`` and insert ``new_layers`` where the first was."""
    kept = [layer for i, layer in enumerate(net.layer) if i not in set(remove)]
    before = sum(1 for i in range(insert_at) if i not in set(remove))
    layers = kept[:before] + list(new_layers) + kept[before:]
    copies = [type(layer)() for layer in layers]
    for copy, layer in zip(copies, layers):
        copy.CopyFrom(layer)
    del net.layer[:]
    net.layer.extend(copies)


def to_train_val(schema: Schema, deploy: Message, heads: Sequence[str], data: DataOptions,
                 item: Optional[Item] = None) -> Message:
    """A train_val net built from a deploy net: data layers and losses added."""
    net = type(deploy)()
    net.CopyFrom(deploy)
    inputs = input_layers(net)
    if len(inputs) != 1:
        raise CaffeFtError(f"a deploy net needs exactly one Input layer to be given data, found {len(inputs)}")
    source = net.layer[inputs[0]]
    shape = list(source.input_param.shape[0].dim) if source.input_param.shape else None
    layers = _new_data_layers(schema, data, source.name, (source.top[0], "label"), [], shape, item)
    _replace_layers(net, inputs, inputs[0], layers)
    # Output layers of the deploy net (a Softmax over the scores) give way to the loss,
    # which reads what they read (after any ReLU, pooling... between the head and them).
    scores = _head_scores(net, heads)
    outputs = sorted({i for sinks, _ in scores for i in sinks if net.layer[i].type in ("Softmax", "ArgMax")})
    _replace_layers(net, outputs, len(net.layer), [])
    for index, (_, top) in enumerate(scores):
        prefix = "" if len(heads) == 1 else f"{heads[index]}/"
        net.layer.extend(_render_layers(schema, "loss_layers.prototxt.j2", prefix=prefix, scores=top, label="label"))
    return net


def to_deploy(schema: Schema, train_val: Message, heads: Sequence[str], item: Optional[Item] = None,
              crop: Optional[int] = None, input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Message:
    """The deploy net matching a train_val net: TEST-phase layers, data and
    loss layers replaced by an Input layer and a Softmax per head.  The input
    shape is what the data layer gives; where its settings do not tell (no
    crop or resize), ``crop`` (``--crop-size``) or the data's ``item``."""
    from ..net.shapes import filter_layers, infer

    net = type(train_val)()
    net.CopyFrom(train_val)
    kept = filter_layers(net, "TEST")
    del net.layer[:]
    net.layer.extend(kept)
    scores = [blob for _, blob in _head_scores(net, heads)]
    sources = data_layers(net)
    data_tops = {top for i in sources for top in net.layer[i].top[1:]}  # labels
    new_layers: List[Message] = []
    if sources:
        first = net.layer[sources[0]]
        try:
            shape = list(infer(train_val, phase="TEST", input_shapes=input_shapes or None).blobs[first.top[0]])
        except CaffeFtError:
            given = (input_shapes or {}).get(first.top[0])
            shape = list(given) if given else _shape_from_transform(first, item, crop)
        shape[0] = 1
        new_layers.append(_input_layer(schema, first.name, first.top[0], shape))
    drop = set(sources)
    for i, layer in enumerate(net.layer):
        if layer.type.endswith(LOSS_SUFFIX) or layer.type == "Accuracy" or set(layer.bottom) & data_tops:
            drop.add(i)
    insert_at = min(drop) if drop else 0
    _replace_layers(net, sorted(drop), insert_at if new_layers else 0, new_layers)
    for layer in net.layer:
        del layer.include[:]
        del layer.exclude[:]
    existing = {layer.name for layer in net.layer}
    softmax = []
    for index, top in enumerate(scores):
        consumers = [layer for layer in net.layer if top in layer.bottom and layer.type in ("Softmax", "ArgMax")]
        if consumers:
            continue
        name = "prob" if len(heads) == 1 else f"{heads[index]}/prob"
        if name in existing:
            name = f"{top}/prob"
        softmax.append(_softmax_layer(schema, name, top))
    net.layer.extend(softmax)
    return net


def _shape_from_transform(layer: Message, item: Optional[Item] = None, crop: Optional[int] = None) -> List[int]:
    """The input shape a data layer feeds, from its crop or resize settings
    (or ``crop``), else from what one example of its data is (``item``)."""
    transform = layer.transform_param
    size = crop or transform.crop_size
    height, width = size, size
    if not size and layer.HasField("image_data_param") and layer.image_data_param.new_height:
        height, width = layer.image_data_param.new_height, layer.image_data_param.new_width
    elif not size and item is not None and item.shape is not None:
        height, width = item.shape[1], item.shape[2]
    if not height:
        raise UnknownInputShape(
            f"cannot tell the input shape of the deploy net: data layer '{layer.name}' sets no crop_size and "
            "its data cannot be looked at; give --crop-size, --input-shape or --train-data"
        )
    if layer.HasField("image_data_param"):
        channels = 3 if layer.image_data_param.is_color else 1
    elif item is not None and item.shape is not None:
        channels = item.shape[0]
    else:
        channels = 1 if len(transform.mean_value) == 1 else 3
    return [1, channels, height, width]


def _with_data(schema: Schema, net: Message, data: DataOptions, item: Optional[Item] = None) -> Message:
    """A train_val net whose data layers read the new data, keeping their preprocessing."""
    result = type(net)()
    result.CopyFrom(net)
    indices = data_layers(result)
    if not indices:
        raise CaffeFtError("the net has no data layers to point at the new data")
    first = result.layer[indices[0]]
    tops = (first.top[0], first.top[1] if len(first.top) > 1 else "label")
    layers = _new_data_layers(schema, data, first.name, tops, [result.layer[i] for i in indices], None, item)
    _replace_layers(result, indices, indices[0], layers)
    return result


def read_originals(solver_file: TextFile) -> Dict[str, List[str]]:
    """The pre-scaling solver values an earlier rewrite recorded, if any."""
    for comment in solver_file.tree.comments():
        if comment.startswith(ORIGINALS_MARK):
            found: Dict[str, List[str]] = {}
            for key, value in re.findall(r"(\w+)=(\S+)", comment[len(ORIGINALS_MARK):]):
                found.setdefault(key, []).append(value)
            return found
    return {}


def originals_comment(values: Mapping[str, object]) -> str:
    """The comment recording ``values`` (exact: ints as ints, float fields as Caffe prints them)."""
    parts = []
    for key, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            text = str(item) if isinstance(item, int) else format_float(float(cast(float, item)))
            parts.append(f"{key}={text}")
    return f"{ORIGINALS_MARK} {' '.join(parts)}"


def _edit_text(file: Optional[TextFile], message: Message) -> str:
    if file is None:
        return prototext.print_message(message)
    return prototext.render_minimal(file.tree, file.data, message, file.path)


def _solver_text(file: TextFile, solver: Message, originals: Mapping[str, object]) -> str:
    text = _edit_text(file, solver)
    mark = originals_comment(originals)
    lines = text.splitlines(True)
    if lines and lines[0].startswith(ORIGINALS_MARK):
        lines[0] = mark + "\n"
    else:
        lines.insert(0, mark + "\n")
    return "".join(lines)


def _default_solver(schema: Schema, net_path: str, prefix: str, schedule: "Schedule",
                    options: SolverOptions) -> Tuple[Message, List[str]]:
    """The fine-tuning template's solver, its run measured in epochs of the data."""
    from .solver import test_interval_for

    epoch = schedule.epoch_iters
    epochs, reason = schedule.default_epochs()
    max_iter = options.max_iter or epochs * epoch
    interval = test_interval_for(max_iter, epoch)
    test_iter = max(1, -(-schedule.val_size // schedule.val_batch))
    text = templating.render(
        "solver.prototxt.j2", net=net_path, test_iter=test_iter,
        test_interval=interval, base_lr=0.001, display=max(1, min(20, interval)), max_iter=max_iter,
        stepsize=max(1, max_iter // 3), snapshot=0, snapshot_prefix=prefix, solver_mode="CPU",
    )
    run = ("max_iter given" if options.max_iter else
           f"{epochs} epochs ({reason}) of {schedule.train_size} examples in batches of {schedule.batch}")
    notes = [f"max_iter {max_iter} ({run}); a step at a third of the run; "
             f"test_interval {interval} ({interval / epoch:.3g} epoch(s); the last test at max_iter scores the final "
             f"weights), test_iter {test_iter} ({schedule.val_size} validation examples once)"]
    return prototext.to_message(prototext.parse(text.encode()), schema.new(SOLVER), "solver.prototxt.j2"), notes


def relative_to(path: Optional[str], folder: str) -> Optional[str]:
    """``path`` (relative to the working directory) as seen from ``folder``, where the
    file naming it is written; an absolute path stays as it is."""
    if not path or os.path.isabs(path):
        return path
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return relative + ("/" if path.endswith("/") and not relative.endswith("/") else "")


def _images_root(data: DataOptions, outdir: str, train: Optional[DataSummary]) -> Optional[str]:
    """The root_folder the written ImageData layers need for the list's relative
    entries to resolve from ``outdir`` (where training runs): the given
    ``--root-folder``, else the folder the first entry (of ``train``, the list's
    summary) exists under (the working directory, as Caffe reads it, or the
    list's own folder)."""
    if data.root_folder:
        return relative_to(data.root_folder.rstrip("/") + "/", outdir)
    if not data.train or train is None or train.first_name is None:
        return None
    name = train.first_name
    if os.path.isabs(name):
        return None
    for base in (".", os.path.dirname(data.train) or "."):
        if os.path.exists(os.path.join(base, name)):
            root = os.path.relpath(os.path.abspath(base), os.path.abspath(outdir))
            return None if root == "." else root + "/"
    return None


def written_data(data: DataOptions, outdir: str, train: Optional[DataSummary] = None) -> DataOptions:
    """``data`` with its paths as the files written to ``outdir`` must name them
    (``train``: the summary of ``data.train``, whose first entry tells the root)."""
    return dataclasses.replace(
        data, train=relative_to(data.train, outdir), val=relative_to(data.val, outdir),
        mean_file=relative_to(data.mean_file, outdir), root_folder=_images_root(data, outdir, train),
    )


def _data_top(net: Message) -> Optional[str]:
    layers = data_layers(net) or input_layers(net)
    return net.layer[layers[0]].top[0] if layers and len(net.layer[layers[0]].top) else None


def data_item(schema: Schema, net: Message, data: DataOptions,
              input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None, train: Optional[DataSummary] = None) -> Item:
    """What one example of the net's input is, from what exists: ``--input-shape``,
    the first example of ``--train-data`` (``train``, its summary: an image's
    header, an LMDB's first Datum), the mean file; ``--gray``/``--color`` decide
    the channels."""
    kinds = {phase: _source_kind(source) for phase, source in (("TRAIN", data.train), ("TEST", data.val)) if source}
    shape: Optional[Tuple[int, int, int]] = None
    origin = ""
    top = _data_top(net)
    given = (input_shapes or {}).get(top or "")
    if given is not None and len(given) == 4:
        shape, origin = (int(given[1]), int(given[2]), int(given[3])), "--input-shape"
    if shape is None and data.train and train is not None and train.first_shape is not None:
        shape, origin = train.first_shape, f"the first example of {data.train}"
    mean_file = data.mean_file or next((net.layer[i].transform_param.mean_file for i in data_layers(net)
                                        if net.layer[i].transform_param.mean_file), "")
    if shape is None and mean_file and os.path.exists(mean_file):
        from ..formats.caffemodel import load_blob

        try:
            dims = load_blob(mean_file, schema).shape
        except CaffeFtError:
            dims = ()
        if len(dims) == 4:
            shape, origin = (int(dims[1]), int(dims[2]), int(dims[3])), f"the mean file {mean_file}"
    if data.channels is not None:
        shape = (data.channels, shape[1], shape[2]) if shape is not None else None
    return Item(shape, origin, kinds)


def plan(
    schema: Schema,
    net_file: TextFile,
    strategy: str,
    options: "strategies.StrategyOptions",
    outdir: str,
    data: DataOptions = DataOptions(),
    solver_file: Optional[TextFile] = None,
    deploy_file: Optional[TextFile] = None,
    solver_options: SolverOptions = SolverOptions(),
    input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
    train: Optional[DataSummary] = None,
    val: Optional[DataSummary] = None,
) -> RewritePlan:
    """Everything a rewrite writes, without writing it.

    Paths in the written files are relative to ``outdir`` (where they are
    written, and where training runs), except where the input gave them absolute.
    ``train`` and ``val`` summarize ``data.train`` and ``data.val`` (read once
    by the caller, :func:`caffe_ft.data.sources.summarize`): the first example,
    the example counts the schedule is measured in."""
    from .solver import Schedule, looks_like_finetuning, rewrite_solver, solver_originals

    if bool(data.train) != bool(data.val):
        raise CaffeFtError("give both --train-data and --val-data, or neither")
    net = net_file.message
    summary: List[str] = []
    result = strategies.apply_strategy(strategy, net, options)
    summary.extend(result.notes)
    heads = [result.heads.get(name, name) for name in result.heads]
    files: Dict[str, Tuple[str, Optional[str], Optional[str]]] = {}
    deploy_input = is_deploy(net)
    item = data_item(schema, net, data, input_shapes, train)
    written = written_data(data, outdir, train)
    if item.shape is not None and data.train:
        summary.append(f"input example {'x'.join(map(str, item.shape))} (C x H x W) from {item.origin}")
    train_val: Optional[Message] = None
    train_val_source: Optional[TextFile] = None
    deploy: Optional[Message] = None
    if deploy_input:
        deploy = result.net
        deploy_source: Optional[TextFile] = net_file
        if data.train:
            train_val = to_train_val(schema, result.net, heads, written, item)
            train_val_source = net_file
            summary.append(f"train_val.prototxt: data from {data.train} (TRAIN) and {data.val} (TEST), "
                           "SoftmaxWithLoss and Accuracy added")
        else:
            summary.append("no --train-data/--val-data: only deploy.prototxt is written")
    else:
        train_val = _with_data(schema, result.net, written, item) if data.train else result.net
        train_val_source = net_file
        if data.train:
            summary.append(f"data layers now read {data.train} (TRAIN) and {data.val} (TEST)")
        if deploy_file is not None:
            # The user's own deploy net, changed the same way (same heads, names, class count).
            present = {layer.name for layer in deploy_file.message.layer}
            same = dataclasses.replace(
                options, heads=tuple(name for name in result.heads if name in present), new_name=None
            )
            deploy_result = strategies.apply_strategy(strategy, deploy_file.message, same)
            deploy = _rename_like(deploy_result.net, deploy_result.heads, result.heads)
            deploy_source = deploy_file
        else:
            try:
                deploy = to_deploy(schema, train_val, heads, item, None if data.train else data.crop_size,
                                   input_shapes)
            except UnknownInputShape as exc:
                if data.train:
                    raise
                deploy = None
                summary.append(f"deploy.prototxt not written: {exc.message}")
            deploy_source = net_file
    if train_val is not None and data.train:
        check_one_label_per_score(train_val, crop_given=data.crop_size is not None)
    if train_val is not None:
        files["train_val.prototxt"] = (_edit_text(train_val_source, train_val),
                                       train_val_source.path if train_val_source else None,
                                       train_val_source.data.decode("utf-8", "replace") if train_val_source else None)
    if deploy is not None:
        files["deploy.prototxt"] = (_edit_text(deploy_source, deploy), deploy_source.path if deploy_source else None,
                                    deploy_source.data.decode("utf-8", "replace") if deploy_source else None)
    net_path = "train_val.prototxt"  # beside the solver: training runs in outdir
    prefix = (net.name or "finetune").replace(" ", "_").lower()
    schedule = None
    if data.train and train is not None and train.count:
        schedule = Schedule(train.count, data.batch_size, val.count if data.val and val is not None else 0,
                            data.val_batch_size, solver_options.epochs, strategy)
    if solver_file is not None:
        originals = read_originals(solver_file)
        finetuning = None if originals else looks_like_finetuning(solver_file.message, net)
        solver, notes = rewrite_solver(
            solver_file.message, lr_scale=solver_options.lr_scale, step_scale=solver_options.step_scale,
            max_iter=solver_options.max_iter, net_path=net_path, snapshot_prefix=prefix,
            originals=originals or None, schedule=schedule, finetuning=finetuning,
        )
        summary.extend(notes)
        recorded = originals or solver_originals(solver_file.message)
        files["solver.prototxt"] = (_solver_text(solver_file, solver, recorded), solver_file.path,
                                    solver_file.data.decode("utf-8", "replace"))
    elif schedule is not None and train_val is not None:
        solver, notes = _default_solver(schema, net_path, prefix, schedule, solver_options)
        summary.append("no --solver: solver.prototxt made from the fine-tuning template (SGD, step policy)")
        summary.extend(notes)
        files["solver.prototxt"] = (prototext.print_message(solver), None, None)
    summary.extend(dropped_comments(files))
    shapes: Dict[str, Tuple[int, ...]] = {}
    if data.train and train_val is not None and deploy is not None and input_layers(deploy):
        source = deploy.layer[input_layers(deploy)[0]]
        if source.input_param.shape and len(source.input_param.shape[0].dim) == 4:
            shapes[source.top[0]] = (data.batch_size, *source.input_param.shape[0].dim[1:])
    return RewritePlan(outdir, files, summary, strategy, dict(result.heads), shapes)


def dropped_comments(files: Dict[str, Tuple[str, Optional[str], Optional[str]]]) -> List[str]:
    """Summary lines for the input comments an output no longer has: those inside
    a layer or field that was replaced or removed (a commented-out block in a
    replaced data layer) go with it, and the reviewer is told which."""
    from collections import Counter

    notes = []
    for name, (text, source, before) in sorted(files.items()):
        if before is None:
            continue
        kept = Counter(comment for _, comment in prototext.comment_lines(text))
        runs: List[List[Tuple[int, str]]] = []  # consecutive lost lines, shown as one range
        for number, comment in prototext.comment_lines(before):
            if kept[comment]:
                kept[comment] -= 1
            elif runs and runs[-1][-1][0] == number - 1:
                runs[-1].append((number, comment))
            else:
                runs.append([(number, comment)])
        if runs:
            shown = "; ".join(
                (f"lines {run[0][0]}-{run[-1][0]}" if len(run) > 1 else f"line {run[0][0]}") + f" '{run[0][1]}'"
                + (" ..." if len(run) > 1 else "") for run in runs)
            count = sum(len(run) for run in runs)
            notes.append(f"{name}: {count} comment line(s) of {source} went with the layers or fields "
                         f"they sat in (replaced or removed): {shown}")
    return notes


def check_one_label_per_score(net: Message, crop_given: bool = False) -> None:
    """Refuse a train net whose SoftmaxWithLoss gets more predictions than
    labels (Caffe aborts on it): an image list gives one label per image,
    but a fully convolutional head scores a grid of positions unless the
    input is cropped to the size it was trained at.  Nets whose shapes
    cannot be told here are left to Caffe."""
    from ..net.shapes import infer

    try:
        blobs = infer(net, phase="TRAIN").blobs
    except CaffeFtError:
        return
    for layer in net.layer:
        if layer.type != "SoftmaxWithLoss" or len(layer.bottom) < 2 or layer.bottom[1] not in blobs:
            continue
        scores, labels = blobs[layer.bottom[0]], blobs[layer.bottom[1]]
        axis = layer.softmax_param.axis % len(scores)
        per_image = math.prod(scores[axis + 1:])
        if math.prod(scores[:axis]) * per_image != math.prod(labels):
            fix = ("--crop-size does not give one score per image; use the input size at which it scores each "
                   "image once" if crop_given else
                   "give --crop-size with the input size at which it scores each image once")
            raise CaffeFtError(
                f"'{layer.bottom[0]}' has shape {' x '.join(map(str, scores))}: {per_image} scores per image "
                f"for one label; {fix} (a fully convolutional net: the size it was trained at)", layer=layer.name,
            )


def _rename_like(net: Message, got: Dict[str, str], wanted: Dict[str, str]) -> Message:
    """Give the deploy net's heads the names the train_val heads got."""
    for old, new in got.items():
        target = wanted.get(old, new)
        if target == new:
            continue
        for layer in net.layer:
            if layer.name == new:
                layer.name = target
            for i, top in enumerate(layer.top):
                if top == new:
                    layer.top[i] = target
            for i, bottom in enumerate(layer.bottom):
                if bottom == new:
                    layer.bottom[i] = target
    return net


# ---------------------------------------------------------------------------
# Showing and writing a plan
# ---------------------------------------------------------------------------

SUMMARY_FILE = "summary.md"


def summary_text(result: RewritePlan) -> str:
    """The human-readable account of a rewrite (also written as summary.md)."""
    lines = [f"# caffe-ft rewrite: {result.strategy}", ""]
    lines.extend(f"- {line}" for line in result.summary)
    lines.append("")
    lines.append("Files:")
    for name, (_, source, _) in sorted(result.files.items()):
        origin = f" (edited from {source})" if source else " (new)"
        lines.append(f"- {name}{origin}")
    return "\n".join(lines) + "\n"


def _unified(before: List[str], after: List[str], fromfile: str, tofile: str, context: int = 3) -> List[str]:
    """``diff -u`` of two line lists.  difflib's own unified_diff treats lines that
    are frequent (a prototxt's ``}`` and ``param {``) as junk and reports them
    changed; matching without that heuristic gives diff's minimal hunks."""
    import difflib

    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    chunks: List[str] = []
    for group in matcher.get_grouped_opcodes(context):
        if not chunks:
            chunks += [f"--- {fromfile}\n", f"+++ {tofile}\n"]
        first, last = group[0], group[-1]
        old_start, old_len = first[1], last[2] - first[1]
        new_start, new_len = first[3], last[4] - first[3]
        chunks.append(f"@@ -{_range(old_start, old_len)} +{_range(new_start, new_len)} @@\n")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                chunks += [" " + line for line in before[i1:i2]]
                continue
            chunks += ["-" + line for line in before[i1:i2]]
            chunks += ["+" + line for line in after[j1:j2]]
    return [line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in chunks]


def _range(start: int, length: int) -> str:
    """A hunk's line range as diff -u prints it (1-based; an empty range names the line before)."""
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"


def unified_diff(result: RewritePlan) -> str:
    """Every output as a unified diff against the file it was edited from."""
    chunks: List[str] = []
    for name, (text, source, before) in sorted(result.files.items()):
        target = os.path.join(result.outdir, name)
        chunks.extend(_unified((before or "").splitlines(True), text.splitlines(True),
                               source or "/dev/null", target))
    return "".join(chunks)


def _outputs(result: RewritePlan, inputs: Sequence[Optional[str]]) -> Tuple[List[str], List[Optional[str]]]:
    """The files :func:`write_plan` writes into OUTDIR, and the inputs none may be."""
    names = sorted(result.files) + sorted(result.blobs) + [SUMMARY_FILE]
    return names, [source for _, source, _ in result.files.values()] + list(inputs)


def check_outputs(result: RewritePlan, force: bool = False, inputs: Sequence[Optional[str]] = ()) -> None:
    """Refuse now what :func:`write_plan` would refuse (a file of OUTDIR that exists,
    without ``force``; one that is an input), for a caller with long work before it."""
    from ..formats.files import check_output

    names, sources = _outputs(result, inputs)
    for name in names:
        check_output(os.path.join(result.outdir, name), sources, force, option="--outdir")


def write_plan(result: RewritePlan, force: bool = False, inputs: Sequence[Optional[str]] = ()) -> None:
    """Write every file of the plan, all or nothing (see ``files.staged_outputs``).

    Existing files are overwritten only with ``force``; a target that is one
    of the plan's inputs (or of ``inputs``: weights, lists) is refused.
    """
    from ..formats.files import staged_outputs

    from ..formats.caffemodel import save_blob

    names, sources = _outputs(result, inputs)
    with staged_outputs(result.outdir, names, sources, force, option="--outdir") as staging:
        for name, (text, _, _) in sorted(result.files.items()):
            staging.write(name, text)
        for name, blob in sorted(result.blobs.items()):
            save_blob(blob, staging.path(name))
        staging.write(SUMMARY_FILE, summary_text(result))
