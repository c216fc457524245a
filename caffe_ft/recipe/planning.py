"""From a net file and :class:`~caffe_ft.recipe.options.RewriteOptions` to a rewrite plan.

Reads the inputs (upgrading legacy nets first, comments kept), settles
``--strategy auto`` (measuring the data's similarity when it is not given)
and the default output folder, and returns what :func:`rewrite.plan` makes.
Nothing is written here; ``say`` receives the notes a user should see.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from ..errors import CaffeFtError, listing
from ..formats import files, prototext
from ..formats.schema import Schema
from . import rewrite, strategies
from .options import RewriteOptions

if TYPE_CHECKING:
    from ..data.sources import DataSummary

Say = Callable[[str], None]


class OptionError(CaffeFtError):
    """Options that do not go together; the CLI shows it as a usage error."""


def current_file(parsed: files.TextFile, schema: Schema, say: Say) -> files.TextFile:
    """``parsed`` itself, or for a legacy net its upgraded text (comments kept)."""
    from ..formats.layout import upgrade_text
    from ..formats.upgrade import net_needs_upgrade

    if not net_needs_upgrade(parsed.message):
        return parsed
    text, notes = upgrade_text(parsed)
    if not notes:  # Caffe's check flags 3-param BatchNorm nets that need nothing
        return parsed
    say(f"{parsed.path}: legacy format upgraded first ({'; '.join(notes)})")
    return files.parse_text(text.encode("utf-8", "surrogateescape"), parsed.path, schema, files.NET)


def choose(schema: Schema, net_path: str, weights: Optional[str], options: RewriteOptions, say: Say,
           engine: str = "auto", train: Optional[DataSummary] = None) -> Tuple[str, strategies.StrategyOptions]:
    """``--strategy auto``: the size x similarity rule (the size counted in
    ``train``, the summary of ``--train-data``), measuring similarity when not
    given (:func:`advise`, through ``engine``; ``auto``: pycaffe where it is
    installed, else torch)."""
    data = options.data
    size = options.dataset_size or (train.count if train else 0)
    if not size:
        raise OptionError("--strategy auto needs --dataset-size N, or --train-data and --val-data to count")
    similarity = options.similarity
    if similarity is None and size > strategies.LARGE_DATASET:
        similarity = "high"  # a large data set fine-tunes the whole net whatever its similarity
    if similarity is None:
        if not (weights and data.train):
            missing = [flag for flag, value in (("--weights", weights), ("--train-data", data.train)) if not value]
            raise OptionError(f"--strategy auto needs --similarity high|low for a data set of {size} "
                              f"(up to {strategies.LARGE_DATASET}), or it measures the data with --weights and "
                              f"--train-data ({', '.join(missing)} missing)")
        from ..training.run import choose_engine
        from .advise import advise

        advice = advise(net_path, weights, data.train, schema=schema, root_folder=data.root_folder,
                        engine=choose_engine(engine, "cpu")[0])
        say(f"auto: rule {advice.rule}")
        if advice.class_weights:
            say("auto: the classes are unbalanced: consider --class-weights auto")
        decay = options.head.layer_decay if options.head.layer_decay is not None else advice.layer_decay
        head = dataclasses.replace(options.head, freeze_until=advice.freeze_until, layer_decay=decay)
        say(f"auto: {advice.strategy}: {advice.reason}")
        return advice.strategy, head
    strategy, head, reason = strategies.choose_strategy(size, similarity, options.head)
    say(f"auto: {strategy}: {reason}")
    return strategy, head


def class_count(options: RewriteOptions, say: Say, summary: Optional[DataSummary]) -> Optional[int]:
    """``--num-classes``, or the number of distinct labels of ``--train-data``
    (``summary``; they must be 0..K-1, as Caffe's SoftmaxWithLoss needs); None
    without either (the heads then keep their ``num_output``).  A given count
    must exceed every label."""
    given = options.head.num_classes
    if given is not None and given < 2:
        raise OptionError(f"--num-classes must be at least 2, not {given}")
    if summary is None:
        return given
    train = summary.path
    if summary.problem is not None:
        if given is not None:
            return given
        raise CaffeFtError(f"cannot count the classes of --train-data ({summary.problem}); give --num-classes",
                           train)
    labels = sorted(set(summary.labels))
    if not labels:
        raise CaffeFtError("the training data holds no examples", train)
    if labels[0] < 0:
        raise CaffeFtError(f"label {labels[0]} is negative; Caffe's labels are 0..K-1", train)
    if given is not None:
        if labels[-1] >= given:
            raise CaffeFtError(f"label {labels[-1]} needs at least {labels[-1] + 1} classes, "
                               f"but --num-classes is {given}", train)
        return given
    missing = sorted(set(range(labels[-1] + 1)) - set(labels))
    if missing:
        raise CaffeFtError(f"labels run to {labels[-1]} but {listing([str(m) for m in missing])} never occur(s); Caffe's labels are 0..K-1: "
                           f"give --num-classes {labels[-1] + 1} if those classes have no training examples",
                           train)
    if len(labels) < 2:
        raise CaffeFtError("every training example has label 0: a classifier needs at least 2 classes", train)
    say(f"--num-classes {len(labels)}: the labels 0..{labels[-1]} of {train}")
    return len(labels)


def weights_channels(schema: Schema, net_file: files.TextFile, weights: str) -> Optional[Tuple[int, str]]:
    """The input channels the pretrained weights need: the first convolution
    reading the data's input blob, its weight blob's channels times its group;
    with that layer's name.  None when the net or the weights do not tell."""
    from ..formats.caffemodel import load_model
    from .rewrite import data_layers, input_layers

    net = net_file.message
    sources = data_layers(net) or input_layers(net)
    if not sources or not net.layer[sources[0]].top:
        return None
    top = net.layer[sources[0]].top[0]
    first = next((layer for layer in net.layer if layer.type == "Convolution" and top in layer.bottom), None)
    if first is None:
        return None
    model = load_model(weights, schema)
    for layer, blobs in zip(model.layers, model.blobs):
        if layer.name == first.name and blobs and len(blobs[0].shape) == 4:
            group = first.convolution_param.group or 1
            return int(blobs[0].shape[1]) * group, first.name
    return None


def plan_rewrite(schema: Schema, net_path: str, options: RewriteOptions, weights: Optional[str] = None,
                 say: Say = lambda text: None, engine: str = "auto") -> rewrite.RewritePlan:
    """The rewrite ``options`` ask for, nothing written yet (``engine`` runs
    the net where ``--strategy auto`` measures the data)."""
    net_file = current_file(files.load_text(net_path, schema, files.NET), schema, say)
    solver_file = files.load_text(options.solver_path, schema, files.SOLVER) if options.solver_path else None
    deploy_file = (current_file(files.load_text(options.deploy_path, schema, files.NET), schema, say)
                   if options.deploy_path else None)
    # The data are read here once; their summaries go to all below who need them.
    data, root = options.data, options.data.root_folder or ""
    train = val = None
    if data.train or data.val:
        from ..data.sources import summarize  # only with data: its import is ~5 ms of every rewrite

        train = summarize(data.train, schema, root) if data.train else None
        val = summarize(data.val, schema, root) if data.val else None
    count = class_count(options, say, train)
    if count != options.head.num_classes:
        options = dataclasses.replace(options, head=dataclasses.replace(options.head, num_classes=count))
    if weights and options.data.train and options.data.channels is None and os.path.exists(weights):
        found = weights_channels(schema, net_file, weights)
        if found is not None:
            say(f"input channels: {found[0]} ('{found[1]}' of {weights} takes {found[0]})")
            options = dataclasses.replace(options, data=dataclasses.replace(options.data, channels=found[0]))
    strategy, head = options.strategy, options.head
    if strategy == "auto":
        strategy, head = choose(schema, net_path, weights, options, say, engine, train)
    outdir = options.outdir or os.path.join(os.path.dirname(net_path) or ".", f"ft-{strategy}")
    solver_options, net_strategy = options.solver, strategy
    if strategy == "lp-ft":
        # The probe fits the head first: it then learns at the body's rate, and all of it more gently.
        net_strategy, head = options.then, dataclasses.replace(head, head_lr_mult=1.0)
        solver_options = dataclasses.replace(solver_options, lr_scale=solver_options.lr_scale * LP_FT_LR)
    try:
        planned = rewrite.plan(schema, net_file, net_strategy, head, outdir, options.data, solver_file, deploy_file,
                               solver_options, options.input_shapes, train, val)
    except CaffeFtError as exc:
        raise exc.located(net_path) from None
    if strategy == "lp-ft":
        planned.strategy = "lp-ft"
        planned.summary.insert(0, f"lp-ft: finetune fits the head on cached features (a linear probe), writes it "
                                  f"into the starting weights, then fine-tunes as '{options.then}' with the head at "
                                  f"lr_mult 1 and base_lr x{LP_FT_LR:g} more (Kumar et al., ICLR 2022)")
    if options.class_weights is not None:
        weigh_classes(schema, planned, options, head.num_classes, say, train)
    return planned


#: lp-ft's fine-tuning rate, relative to a plain fine-tuning's: the probed head needs no large steps.
LP_FT_LR = 0.1


def weigh_classes(schema: Schema, planned: rewrite.RewritePlan, options: RewriteOptions,
                  num_classes: Optional[int], say: Say, train: Optional[DataSummary]) -> None:
    """``--class-weights``: the new heads' losses become InfogainLoss with a diagonal H
    beside the nets (``auto``: weights from the labels ``train`` summarizes)."""
    from . import class_weights as cw

    name = "train_val.prototxt"
    if name not in planned.files:
        raise CaffeFtError("--class-weights needs a train_val net (a net with its loss layers)")
    if num_classes is None:
        raise CaffeFtError("--class-weights needs the class count: give --train-data or --num-classes")
    counts = cw.label_counts(train.labels, num_classes) if train is not None and train.problem is None else None
    if options.class_weights == "auto":
        if counts is None:
            raise CaffeFtError("--class-weights auto counts the labels of --train-data: give it, or a file of weights"
                               if train is None else f"--class-weights auto cannot count the labels of --train-data "
                               f"({train.problem})", train.path if train else None)
        weights, how = cw.balanced(counts), "auto: N / (K n_k)"
    else:
        weights, how = cw.read_weights(options.class_weights or "", num_classes), options.class_weights or ""
    text, source_path, source_text = planned.files[name]
    data = text.encode("utf-8", "surrogateescape")
    tree = prototext.parse(data, name)
    net = prototext.to_message(tree, schema.new(files.NET), name)
    changed = cw.use_infogain(net, set(planned.heads.values()))
    planned.files[name] = (prototext.render_minimal(tree, data, net, name), source_path, source_text)
    planned.blobs[cw.H_FILE] = cw.h_matrix(weights)
    line = cw.describe(counts or [0] * num_classes, weights, how)
    planned.summary.append(f"{line}; {', '.join(changed)}: SoftmaxWithLoss -> InfogainLoss with H = diag(weights) "
                           f"in {cw.H_FILE} (Caffe's InfogainLoss takes the softmax itself; deploy unchanged)")
    say(line)
