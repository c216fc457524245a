"""Fine-tuning strategies: pure functions ``NetParameter -> Result``.

A strategy takes a current-format net (train_val or deploy) and returns a
rewritten copy ready for fine-tuning on ``num_classes`` classes, with notes
saying what changed and why.  It never touches files or pycaffe::

    net = io.load_text("train_val.prototxt", schema, io.NET).message   # load
    result = apply_strategy("last-fc", net, StrategyOptions(num_classes=20))  # apply
    text = textformat.print_message(result.net)                          # save

``features`` (the fixed-feature-extractor recipe) rewrites the net exactly
as ``last-fc`` does; only ``caffe-ft finetune`` treats it differently (it
fits the head with scikit-learn on cached features, see
:mod:`caffe_ft.heads.fit`).

The recipe (CS231n's transfer-learning notes, Caffe's fine-tuning example):

* **Heads.**  The classifier heads are found by :func:`graph.find_heads` (or
  given with ``--head``).  Each kept head gets ``num_output: N``, a new name
  (``fc8`` -> ``fc8_ft``, or ``--new-name``) so that Caffe, which copies
  pretrained weights by layer name, starts it afresh, fillers (the original
  ones when set, else gaussian std 0.01 and constant 0) and multipliers
  ``head_lr_mult`` (weights, decay 1) and ``2 * head_lr_mult`` (bias, decay 0).
  Its output blob is renamed along when it was named like the layer.
* **Main and auxiliary heads.**  The main heads are those whose loss counts
  most (the largest ``loss_weight`` of a loss layer they feed: GoogLeNet's
  side losses weigh 0.3), plus heads sharing parameters with one.  In a net
  without loss layers (deploy) every head is main.  An auxiliary head whose
  gradient reaches no trainable layer outside its own branch (always under
  ``last-fc``; under ``top`` when its branch leaves the trunk in the frozen
  part) could only train itself, so it is removed with the layers that only
  serve it; otherwise it is replaced like a main head.  No head is ever left
  at the old class count.
* **Freezing.**  A frozen layer gets one explicit ``param`` entry per blob
  with ``lr_mult: frozen_lr_mult`` and ``decay_mult: 0`` (a missing entry
  means ``lr_mult: 1`` in Caffe); shared-parameter names are kept.  A frozen
  BatchNorm gets ``use_global_stats: true`` (Caffe updates its statistics in
  TRAIN whatever ``lr_mult`` says), and the Scale/Bias layers reading its
  output are frozen with it.  If one layer of a parameter-sharing group is
  frozen, the whole group is (Caffe aborts on shared parameters with
  different multipliers).
* **Training part.**  Multipliers are kept, except that a layer whose every
  multiplier is 0 (frozen before) gets Caffe's convention: weights 1/decay 1,
  biases 2/decay 0.  BatchNorm multipliers and settings are left alone.

Multipliers are set, never multiplied, so running a strategy on its own
output changes nothing.  A "learnable layer" (for ``top``'s counting) is one
with parameter blobs that is not BatchNorm, see :func:`graph.has_parameters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from google.protobuf.message import Message

from ..net import graph
from ..errors import CaffeFtError, listing

#: What a derived head name ends with (``fc8`` -> ``fc8_ft``).
HEAD_SUFFIX = "_ft"
#: Datasets below this many images are "small", above LARGE_DATASET "large".
SMALL_DATASET = 5000
LARGE_DATASET = 10000
SIMILARITIES = ("high", "low")


@dataclass(frozen=True)
class StrategyOptions:
    """Everything a strategy may be told (the CLI's flags, one field each).

    ``top`` needs exactly one of ``freeze_until`` (that layer and every layer
    before it in net order are frozen), ``train_last`` (the last K learnable
    layers train, heads included) and ``freeze_fraction`` (the first
    ``floor(n * fraction)`` of the n learnable layers are frozen; what
    :func:`choose_strategy` asks for).  Learnable layers on an auxiliary
    head's branch are not counted.  A Scale/Bias layer reading a BatchNorm
    trains or freezes with it: when the K-th last learnable layer is one,
    the BatchNorm and its whole Scale/Bias chain train.
    """

    num_classes: Optional[int] = None  # None: each head keeps its num_output
    heads: Tuple[str, ...] = ()  # --head: overrides detection (old or already replaced names)
    new_name: Optional[str] = None  # --new-name: a single head's new name
    head_lr_mult: float = 10.0  # the heads' weights; their biases get twice as much
    frozen_lr_mult: float = 0.0  # 0 freezes; a small value (0.001) trains "very slowly"
    freeze_until: Optional[str] = None
    train_last: Optional[int] = None
    freeze_fraction: Optional[float] = None
    layer_decay: Optional[float] = None  # --layer-decay F: lr_mult x F per step down from the heads


@dataclass(frozen=True)
class Result:
    """A rewritten net and what was done to it."""

    net: Message
    notes: Tuple[str, ...]
    heads: Dict[str, str] = field(default_factory=dict)  # old name -> new name
    frozen: Tuple[str, ...] = ()  # layers whose parameters (or BN statistics) are frozen
    removed: Tuple[str, ...] = ()  # layers dropped with auxiliary heads


# --------------------------------------------------------------------------
# Heads


@dataclass(frozen=True)
class _Heads:
    """The heads of a net, as layer indices, and the auxiliary branches."""

    main: Tuple[int, ...]
    aux: Tuple[int, ...]
    branches: Dict[int, FrozenSet[int]]  # aux head -> its head, losses and the layers only feeding it


def _indices(layers: Sequence[Message], names: Sequence[str]) -> List[int]:
    wanted = set(names)
    return [i for i, layer in enumerate(layers) if layer.name in wanted]


def _detected_heads(net: Message) -> Tuple[str, ...]:
    search = graph.find_heads(net)
    candidates = ", ".join(graph.head_candidates(net)) or "none"
    if search.blocked:
        blocked = ", ".join(f"'{name}'" for name in search.blocked)
        raise CaffeFtError(
            f"cannot tell the classifier head: {blocked} sits between the last "
            f"InnerProduct/Convolution and a loss/Softmax/Accuracy layer "
            f"(layers with parameters near the end: {candidates}); pass --head LAYER"
        )
    if not search.heads:
        raise CaffeFtError(
            "no classifier head found: no InnerProduct/Convolution layer feeds a "
            f"loss, Softmax or Accuracy layer (layers with parameters near the end: "
            f"{candidates}); pass --head LAYER"
        )
    return search.heads


def _given_heads(net: Message, options: StrategyOptions) -> Tuple[str, ...]:
    """The ``--head`` layers.  A name that is gone but whose replacement name
    (:func:`derived_name`) is there means that replacement, so that running
    again on a rewritten net with the same options works."""
    present = {layer.name for layer in net.layer}
    names = []
    for given in options.heads:
        name = given
        if given not in present and derived_name(given, options) in present:
            name = derived_name(given, options)
        layer = net.layer[graph.layer_index(net, name)]
        if layer.type not in graph.HEAD_TYPES:
            raise CaffeFtError(
                f"--head '{given}' is a {layer.type} layer; a head must be "
                "InnerProduct, Convolution or Deconvolution"
            )
        index = graph.layer_index(net, name)
        layers = list(net.layer)
        fed = sorted(i for i in graph.downstream(layers, [index])
                     if i != index and layers[i].type in graph.HEAD_TYPES)
        if fed:
            raise CaffeFtError(
                f"--head '{given}' feeds '{layers[fed[0]].name}' ({layers[fed[0]].type}), which maps it to other "
                f"outputs: a head is the last such layer before the scores (did you mean --head {layers[fed[0]].name}?)"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _head_weight(layers: Sequence[Message], head: int) -> float:
    """The largest loss weight among the layers that read the head's output."""
    return max((graph.loss_weight(layers[i]) for i in graph.downstream(layers, [head])), default=0.0)


def _split_heads(layers: Sequence[Message], heads: Sequence[int]) -> _Heads:
    """Main heads (the heaviest loss, and their sharers) and auxiliary ones."""
    weights = {head: _head_weight(layers, head) for head in heads}
    top = max(weights.values())
    main = {head for head in heads if weights[head] == top}
    for group in graph.sharing_groups(layers):
        if group & main:
            main |= group & set(heads)
    serving_main = graph.downstream(layers, main)
    aux, branches = [], {}
    for head in sorted(set(heads) - main):
        reached = graph.downstream(layers, [head])
        if reached & serving_main:  # its output also feeds the main loss: not separable
            main.add(head)
            continue
        aux.append(head)
        branches[head] = frozenset(graph.exclusive_branch(layers, reached))
    return _Heads(tuple(sorted(main)), tuple(aux), branches)


def derived_name(old: str, options: StrategyOptions) -> str:
    """A replaced head's new name: ``new_name`` when given, else ``old`` with
    :data:`HEAD_SUFFIX` (kept as is when it already ends so: idempotent)."""
    if options.new_name:
        return options.new_name
    return old if old.endswith(HEAD_SUFFIX) else old + HEAD_SUFFIX


def _num_output_params(layer: Message) -> Message:
    return layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param


def _set_fresh_head(layer: Message, options: StrategyOptions) -> None:
    """``num_output``, fillers and head multipliers of one head (in place)."""
    params = _num_output_params(layer)
    if options.num_classes is not None:
        params.num_output = options.num_classes
    if not params.HasField("weight_filler"):
        params.weight_filler.type = "gaussian"
        params.weight_filler.std = 0.01
    if 1 in graph.bias_blobs(layer) and not params.HasField("bias_filler"):
        params.bias_filler.type = "constant"
        params.bias_filler.value = 0
    del layer.blobs[:]  # embedded weights have the old class count
    _set_multipliers(layer, lambda blob, bias: (
        (2 * options.head_lr_mult, 0.0) if bias else (options.head_lr_mult, 1.0)
    ))


def _rename_blob(layers: Sequence[Message], start: int, old: str, new: str) -> None:
    """Rename blob ``old`` (produced by layer ``start``) to ``new`` in the
    layers after ``start`` that read it, following in-place layers, up to the
    first layer that produces another blob called ``old``."""
    for layer in layers[start + 1:]:
        reads = old in layer.bottom
        for i, bottom in enumerate(layer.bottom):
            if bottom == old:
                layer.bottom[i] = new
        if old in layer.top:
            if not reads:
                return  # redefined: later readers mean the new blob
            for i, top in enumerate(layer.top):
                if top == old:
                    layer.top[i] = new


def _rename_heads(layers: Sequence[Message], heads: Sequence[int], options: StrategyOptions) -> Dict[str, str]:
    """Give every head its new name (and its output blob too, when it was
    named like the layer); refuse names already taken."""
    renames = {layers[i].name: derived_name(layers[i].name, options) for i in heads}
    if options.new_name and len(renames) > 1:
        listed = ", ".join(f"'{name}'" for name in renames)
        raise CaffeFtError(
            f"--new-name needs a single head, but {len(renames)} heads are replaced "
            f"({listed}); leave it out to get derived names"
        )
    taken = {layer.name for layer in layers} - set(renames)
    blobs = {top for layer in layers for top in layer.top}
    for old, new in renames.items():
        if new != old and (new in taken or new in blobs):
            raise CaffeFtError(f"cannot rename head '{old}' to '{new}': that name is already used")
    for index in heads:
        layer = layers[index]
        new = renames[layer.name]
        if layer.top and layer.top[0] == layer.name and new != layer.name:
            _rename_blob(layers, index, layer.name, new)
            layer.top[0] = new
        layer.name = new
    return renames


# --------------------------------------------------------------------------
# Multipliers


def _set_multipliers(layer: Message, rule: Callable[[int, bool], Tuple[float, float]]) -> None:
    """Give each parameter blob an explicit ``param`` entry with the
    ``(lr_mult, decay_mult)`` that ``rule(blob, is_bias)`` returns."""
    biases = graph.bias_blobs(layer)
    for blob in range(graph.param_blob_count(layer)):
        spec = layer.param[blob] if blob < len(layer.param) else layer.param.add()
        spec.lr_mult, spec.decay_mult = rule(blob, blob in biases)


def _freeze(layer: Message, options: StrategyOptions) -> None:
    if layer.type == "BatchNorm":
        layer.batch_norm_param.use_global_stats = True
    else:
        _set_multipliers(layer, lambda blob, bias: (options.frozen_lr_mult, 0.0))


def _was_frozen(layer: Message) -> bool:
    """A learnable layer whose every multiplier is 0 (frozen by an earlier run)."""
    return graph.has_parameters(layer) and not graph.is_learnable(layer)


def _caffe_convention(blob: int, bias: bool) -> Tuple[float, float]:
    return (2.0, 0.0) if bias else (1.0, 1.0)


def _normalizers(layers: Sequence[Message], bn: int) -> Set[int]:
    """The Scale/Bias layers applied to BatchNorm ``bn``'s output (a chain of them)."""
    readers = graph.consumers(layers)
    found: Set[int] = set()
    stack = [bn]
    while stack:
        for reader in readers[stack.pop()]:
            if layers[reader].type in ("Scale", "Bias") and reader not in found:
                found.add(reader)
                stack.append(reader)
    return found


def _close_frozen(layers: Sequence[Message], frozen: Set[int], heads: Set[int]) -> Set[int]:
    """``frozen`` plus the Scale/Bias layers of frozen BatchNorms and every
    layer sharing parameters with a frozen one, repeated until stable."""
    groups = graph.sharing_groups(layers)
    result = set(frozen)
    while True:
        grown = set(result)
        for index in result:
            if layers[index].type == "BatchNorm":
                grown |= _normalizers(layers, index)
        for group in groups:
            if group & grown:
                grown |= {i for i in group if graph.param_blob_count(layers[i])}
        if grown & heads:
            head = layers[min(grown & heads)].name
            raise CaffeFtError(
                f"head '{head}' shares parameters with a layer that is frozen; "
                "choose the heads with --head or another strategy"
            )
        if grown == result:
            return result
        result = grown


# --------------------------------------------------------------------------
# Plans: what each strategy freezes


@dataclass(frozen=True)
class _Plan:
    """A strategy's decision: the layers in the frozen part, and a note."""

    frozen: FrozenSet[int]
    note: str


Planner = Callable[[Sequence[Message], _Heads, StrategyOptions], _Plan]


def _on_branches(heads: _Heads) -> Set[int]:
    return set().union(*heads.branches.values()) if heads.branches else set()


def _plan_last_fc(layers: Sequence[Message], heads: _Heads, options: StrategyOptions) -> _Plan:
    """Only the new head(s) train; every other layer is frozen."""
    skip = _on_branches(heads) | set(heads.main)
    frozen = frozenset(i for i in range(len(layers)) if i not in skip)
    return _Plan(frozen, "last-fc: only the new head(s) train; every other layer is frozen")


def _plan_features(layers: Sequence[Message], heads: _Heads, options: StrategyOptions) -> _Plan:
    """last-fc's net (only the new head(s) train); ``finetune`` fits the head
    with scikit-learn on features of the frozen trunk computed once."""
    frozen = _plan_last_fc(layers, heads, options).frozen
    return _Plan(frozen, "features: the net is last-fc's (only the new head trains, every other layer is "
                         "frozen); `caffe-ft finetune --strategy features` fits the head with scikit-learn "
                         "on features of the frozen trunk computed once")


def _plan_full(layers: Sequence[Message], heads: _Heads, options: StrategyOptions) -> _Plan:
    """Every layer trains; the new head(s) learn faster."""
    return _Plan(frozenset(), "full: every layer trains; the new head(s) learn faster")


def _trunk_learnable(layers: Sequence[Message], heads: _Heads) -> List[int]:
    """Learnable layers in net order, leaving out auxiliary branches."""
    on_branches = _on_branches(heads)
    return [i for i, layer in enumerate(layers) if graph.has_parameters(layer) and i not in on_branches]


def _back_to_batch_norm(layers: Sequence[Message], index: int) -> int:
    """The BatchNorm a Scale/Bias layer normalizes for (so they train together),
    else ``index``."""
    sources = graph.producers(layers)
    current = index
    while layers[current].type in ("Scale", "Bias") and sources[current]:
        previous = sources[current][0]
        if previous is None:
            break
        current = previous
        if layers[current].type == "BatchNorm":
            return current
    return index


def _plan_top(layers: Sequence[Message], heads: _Heads, options: StrategyOptions) -> _Plan:
    """The first layers are frozen (up to ``freeze_until``, or all but the
    last ``train_last`` learnable layers, or the first ``freeze_fraction`` of
    them), the rest train.  A Scale/Bias layer trains with its BatchNorm."""
    learnable = _trunk_learnable(layers, heads)
    if options.freeze_until is not None:
        names = [layer.name for layer in layers]
        cut = names.index(options.freeze_until)
        last_head = max(heads.main)
        if cut >= last_head or cut in heads.main:
            head = layers[cut if cut in heads.main else last_head].name
            raise CaffeFtError(
                f"--freeze-until '{options.freeze_until}' is not before the head "
                f"'{head}'; use --strategy last-fc to train the head alone"
            )
        start = cut + 1
        why = f"top: '{options.freeze_until}' and every layer before it are frozen"
    else:
        if options.train_last is not None:
            keep, how = options.train_last, f"--train-last {options.train_last}"
        else:
            fraction = options.freeze_fraction or 0.0
            keep = len(learnable) - math.floor(len(learnable) * fraction + 1e-9)
            how = f"the first {fraction:.3g} of them frozen"
        if not 1 <= keep <= len(learnable):
            raise CaffeFtError(
                f"--train-last must be between 1 and {len(learnable)} "
                f"(the net's learnable layers), not {keep}"
            )
        start = _back_to_batch_norm(layers, learnable[-keep])
        why = (f"top: the last {keep} of {len(learnable)} learnable layers train ({how}); "
               "the layers before them are frozen")
    skip = _on_branches(heads) | set(heads.main)
    frozen = frozenset(i for i in range(start) if i not in skip)
    return _Plan(frozen, why)


# --------------------------------------------------------------------------
# Putting it together


def _validate(strategy: str, options: StrategyOptions) -> None:
    if options.num_classes is not None and options.num_classes < 2:
        raise CaffeFtError(f"--num-classes must be at least 2, not {options.num_classes} "
                           "(a classifier over one class learns nothing)")
    if not options.head_lr_mult > 0:
        raise CaffeFtError(f"the head's lr_mult must be positive, not {options.head_lr_mult:g}")
    if not options.frozen_lr_mult >= 0:
        raise CaffeFtError(f"the frozen lr_mult must be 0 or more, not {options.frozen_lr_mult:g}")
    if options.new_name is not None and not options.new_name.strip():
        raise CaffeFtError("--new-name must not be empty")
    depth = {
        "--freeze-until": options.freeze_until,
        "--train-last": options.train_last,
        "freeze_fraction": options.freeze_fraction,
    }
    given = [flag for flag, value in depth.items() if value is not None]
    if strategy != "top" and given:
        raise CaffeFtError(f"{given[0]} only applies to --strategy top, not {strategy}")
    if strategy == "top" and len(given) != 1:
        what = " and ".join(given) if given else "neither"
        raise CaffeFtError(
            f"--strategy top needs exactly one of --freeze-until LAYER or --train-last K (got {what})"
        )
    fraction = options.freeze_fraction
    if fraction is not None and not 0 <= fraction < 1:
        raise CaffeFtError(f"freeze_fraction must be in [0, 1), not {fraction:g}")
    decay = options.layer_decay
    if decay is not None and not 0 < decay <= 1:
        raise CaffeFtError(f"--layer-decay must be in (0, 1], not {decay:g}")


def _aux_is_useful(layers: Sequence[Message], branch: FrozenSet[int], frozen: Set[int]) -> bool:
    """Whether an auxiliary branch's gradient reaches a layer outside it that trains."""
    reached = graph.upstream(layers, branch) - branch
    return any(graph.has_parameters(layers[i]) and i not in frozen for i in reached)


def _names(layers: Sequence[Message], indices: Set[int]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(layers[i].name for i in sorted(indices)))


def _decide(
    layers: Sequence[Message], heads: _Heads, plan: _Plan
) -> Tuple[Set[int], Set[int], List[int], List[str]]:
    """From a plan to layer sets: frozen, removed (auxiliary heads that
    could only train themselves, with their branches) and replaced heads."""
    frozen = {i for i in plan.frozen if graph.param_blob_count(layers[i])}
    frozen = _close_frozen(layers, frozen, set(heads.main))
    notes = [plan.note]
    dropped = [aux for aux in heads.aux if not _aux_is_useful(layers, heads.branches[aux], frozen)]
    for aux in dropped:
        notes.append(
            f"removed auxiliary head '{layers[aux].name}' and the layers only serving it: "
            "its gradient reaches no layer that trains, so it would only train itself"
        )
    seed = set().union(*(heads.branches[aux] for aux in dropped))
    removed = graph.exclusive_branch(layers, seed) if seed else set()
    replaced = sorted(set(heads.main) | set(heads.aux) - set(dropped))
    return frozen - removed, removed, replaced, notes


def _set_body_multipliers(
    layers: Sequence[Message], frozen: Set[int], skip: Set[int], options: StrategyOptions
) -> List[str]:
    """Freeze the ``frozen`` layers; give the other non-``skip`` layers that
    were frozen before Caffe's default multipliers."""
    notes = []
    for index in sorted(frozen):
        _freeze(layers[index], options)
    if frozen:
        bn = "; BatchNorm: use_global_stats" if any(layers[i].type == "BatchNorm" for i in frozen) else ""
        notes.append(
            f"froze {len(frozen)} layer(s): {listing(_names(layers, frozen))} "
            f"(lr_mult {options.frozen_lr_mult:g}, decay_mult 0{bn})"
        )
    kept = frozen | skip  # built once: a union inside the comprehension would make this quadratic
    thawed = {i for i, layer in enumerate(layers) if i not in kept and _was_frozen(layer)}
    for index in sorted(thawed):
        _set_multipliers(layers[index], _caffe_convention)
    if thawed:
        notes.append(
            f"{listing(_names(layers, thawed))}: had lr_mult 0 but must train; "
            "now weights 1 (decay 1), biases 2 (decay 0)"
        )
    return notes


def _decay_mults(layer: Message) -> List[float]:
    """Each parameter blob's decay_mult as Caffe applies it (1 where no param entry says)."""
    return [layer.param[i].decay_mult if i < len(layer.param) else 1.0
            for i in range(graph.param_blob_count(layer))]


def _replace_heads(
    layers: Sequence[Message], replaced: Sequence[int], options: StrategyOptions
) -> Tuple[Dict[str, str], List[str]]:
    """Fresh heads at the new class count, renamed; returns the renames and notes."""
    old_outputs = {layers[i].name: _num_output_params(layers[i]).num_output for i in replaced}
    old_decays = {layers[i].name: _decay_mults(layers[i]) for i in replaced}
    for index in replaced:
        _set_fresh_head(layers[index], options)
    new_decays = {layers[i].name: _decay_mults(layers[i]) for i in replaced}
    renames = _rename_heads(layers, replaced, options)
    notes = []
    for old, new in renames.items():
        renamed = (
            f"renamed '{new}' (Caffe copies pretrained weights by layer name, so it starts afresh)"
            if new != old else "name kept"
        )
        count = (f"num_output {old_outputs[old]} -> {options.num_classes}" if options.num_classes is not None
                 else f"num_output {old_outputs[old]} kept (no --num-classes or --train-data to count classes in)")
        decays = [f"{'bias' if blob else 'weights'} {a:g} -> {b:g}"
                  for blob, (a, b) in enumerate(zip(old_decays[old], new_decays[old])) if a != b]
        notes.append(
            f"head '{old}': {count}, {renamed}, "
            f"lr_mult {options.head_lr_mult:g} (bias {2 * options.head_lr_mult:g})"
            + (f", decay_mult {', '.join(decays)}" if decays else "")
        )
    return renames, notes


#: Layers where branches join: a residual or inception block ends at one.
_JOINS = frozenset({"Eltwise", "Concat"})


def _block_ends(layers: Sequence[Message]) -> Set[int]:
    """Layers after which a block ends: joins, and the last writers of a blob
    that several layers read (where a residual or inception block forks)."""
    writer: Dict[str, int] = {}
    readers: Dict[Tuple[str, int], int] = {}
    for index, layer in enumerate(layers):
        in_place = set(layer.top) & set(layer.bottom)
        for bottom in layer.bottom:
            if bottom in writer and bottom not in in_place:
                key = (bottom, writer[bottom])
                readers[key] = readers.get(key, 0) + 1
        for top in layer.top:
            writer[top] = index
    ends = {index for index, layer in enumerate(layers) if layer.type in _JOINS}
    return ends | {index for (_, index), count in readers.items() if count > 1}


def decay_steps(layers: Sequence[Message], heads: Set[int], fixed: Set[int]) -> Dict[int, int]:
    """How many steps below the heads each training layer is (heads: 0).

    Walking down from the last layer, each learnable layer that trains (not a
    head, not in ``fixed``, some ``lr_mult`` above 0) is one step further; in
    a net with joins (Eltwise, Concat) a whole block, the learnable layers
    between a fork and its join (:func:`_block_ends`), is one step, so ResNet's and GoogLeNet's branches of a
    block learn at one rate.  A parameter-sharing group takes its highest
    layer's step (Caffe aborts on shared blobs with different multipliers).
    """
    blocks = any(layer.type in _JOINS for layer in layers)
    ends = _block_ends(layers) if blocks else set()
    steps: Dict[int, int] = {}
    step, in_block = 0, False
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if index in ends:
            in_block = False
        if layer.type in _JOINS:
            continue
        if index in heads or index in fixed or not graph.has_parameters(layer) or not graph.is_learnable(layer):
            continue
        if not (blocks and in_block):
            step += 1
            in_block = True
        steps[index] = step
    shared: Dict[str, int] = {}
    for index, step in steps.items():
        for spec in layers[index].param:
            if spec.name:
                shared[spec.name] = min(shared.get(spec.name, step), step)
    for index in steps:
        for spec in layers[index].param:
            if spec.name:
                steps[index] = min(steps[index], shared[spec.name])
    return steps


def layer_decay(layers: Sequence[Message], heads: Set[int], fixed: Set[int], factor: float) -> List[str]:
    """Layer-wise learning-rate decay: every training layer's multipliers times
    ``factor ** step`` (:func:`decay_steps`), written explicitly on every blob.

    The heads keep theirs, ``fixed`` layers (frozen, removed) are left alone,
    decay_mult is kept.  Applied to the strategy's multipliers, so running it
    on its own output decays again.
    """
    steps = decay_steps(layers, heads, fixed)
    for index, step in steps.items():
        layer = layers[index]
        current = [(layer.param[b].lr_mult if b < len(layer.param) and layer.param[b].HasField("lr_mult") else 1.0,
                    layer.param[b].decay_mult if b < len(layer.param) and layer.param[b].HasField("decay_mult")
                    else 1.0) for b in range(graph.param_blob_count(layer))]
        _set_multipliers(layer, lambda blob, bias: (float(f"{current[blob][0] * factor ** step:.6g}"),
                                                    current[blob][1]))
    if not steps:
        return [f"--layer-decay {factor:g}: no training layer below the heads"]
    deepest = max(steps.values())
    unit = "block" if any(layer.type in _JOINS for layer in layers) else "layer"
    return [f"layer decay {factor:g}: lr_mult x {factor:g} per {unit} down from the heads, "
            f"{deepest} step(s), the lowest x {factor ** deepest:.3g} ({layers[min(steps)].name})"]


def _pointless_accuracies(layers: Sequence[Message], heads: Sequence[int], num_classes: Optional[int]) -> Set[int]:
    """Accuracy layers scoring the new heads with a ``top_k`` (above 1) of at
    least the new class count: GoogLeNet's top-5 with fewer than 6 classes."""
    if num_classes is None:
        return set()
    return {
        i for i in graph.downstream(layers, heads)
        if layers[i].type == "Accuracy" and layers[i].accuracy_param.top_k > 1
        and layers[i].accuracy_param.top_k >= num_classes
    }


def _run(strategy: str, planner: Planner, net: Message, options: StrategyOptions) -> Result:
    """Validate, find the heads, let ``planner`` decide, apply to a copy of ``net``."""
    _validate(strategy, options)
    out = type(net)()
    out.CopyFrom(net)
    layers = list(out.layer)
    names = _given_heads(out, options) if options.heads else _detected_heads(out)
    if options.freeze_until is not None:
        graph.layer_index(out, options.freeze_until)  # unknown name: error with suggestions
    heads = _split_heads(layers, _indices(layers, names))
    frozen, removed, replaced, notes = _decide(layers, heads, planner(layers, heads, options))
    frozen_names, removed_names = _names(layers, frozen), _names(layers, removed)
    notes += _set_body_multipliers(layers, frozen, removed | set(replaced), options)
    renames, head_notes = _replace_heads(layers, replaced, options)
    notes += head_notes
    if options.layer_decay is not None:
        notes += layer_decay(layers, set(replaced), frozen | removed, options.layer_decay)
    pointless = _pointless_accuracies(layers, replaced, options.num_classes) - removed
    if pointless:
        notes.append(
            f"removed {listing(_names(layers, pointless))}: a top-k accuracy with k >= "
            f"{options.num_classes} classes is always 1 (Caffe aborts when k exceeds the classes)"
        )
        removed = removed | pointless
        removed_names = _names(layers, removed)
    for index in sorted(removed, reverse=True):
        del out.layer[index]
    if removed:
        notes.append(f"removed {len(removed_names)} layer(s): {listing(removed_names)}")
    return Result(out, tuple(notes), renames, frozen_names, removed_names)


def _strategy(name: str, planner: Planner) -> Callable[[Message, StrategyOptions], Result]:
    def run(net: Message, options: StrategyOptions) -> Result:
        return _run(name, planner, net, options)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = planner.__doc__
    return run


#: Strategy name -> function ``(net, options) -> Result``.
STRATEGIES: Dict[str, Callable[[Message, StrategyOptions], Result]] = {
    "last-fc": _strategy("last-fc", _plan_last_fc),
    "top": _strategy("top", _plan_top),
    "full": _strategy("full", _plan_full),
    "features": _strategy("features", _plan_features),
}


def apply_strategy(name: str, net: Message, options: StrategyOptions) -> Result:
    """Run strategy ``name`` on a copy of ``net`` (which is left untouched)."""
    try:
        strategy = STRATEGIES[name]
    except KeyError:
        choices = ", ".join(STRATEGIES)
        raise CaffeFtError(f"unknown strategy '{name}' (choose from {choices})") from None
    return strategy(net, options)


def choose_strategy(
    dataset_size: int, similarity: str, options: StrategyOptions
) -> Tuple[str, StrategyOptions, str]:
    """The CS231n rule: how much to retrain, from the dataset's size and its
    similarity to the data the model was trained on.

    ======================  ==========================  ==========================
    images                  similar ("high")            different ("low")
    ======================  ==========================  ==========================
    < 5000                  last-fc                     top, first third frozen
    5000 .. 10000           top, first 2/3 frozen       top, first third frozen
    > 10000                 full                        full
    ======================  ==========================  ==========================

    The middle band has no rule of its own in CS231n; it takes the cautious
    side: similar data keeps most pretrained features (two thirds frozen),
    different data retrains more of them (one third frozen).  Returns the
    strategy, ``options`` with ``freeze_fraction`` set where needed, and a
    sentence explaining the choice.  ``options`` must leave the depth to the
    rule (no ``freeze_until``, ``train_last`` or ``freeze_fraction``).
    """
    if dataset_size < 1:
        raise CaffeFtError(f"the dataset size must be at least 1 image, not {dataset_size}")
    if similarity not in SIMILARITIES:
        raise CaffeFtError(f"similarity must be 'high' or 'low', not '{similarity}'")
    if (options.freeze_until, options.train_last, options.freeze_fraction) != (None, None, None):
        raise CaffeFtError("--strategy auto decides how much to freeze: leave out --freeze-until and --train-last")
    similar = similarity == "high"
    fraction: Optional[float] = None
    if dataset_size < SMALL_DATASET:
        size = f"small ({dataset_size} < {SMALL_DATASET} images)"
        name, fraction = ("last-fc", None) if similar else ("top", 1 / 3)
    elif dataset_size > LARGE_DATASET:
        size = f"large ({dataset_size} > {LARGE_DATASET} images)"
        name = "full"
    else:
        size = f"medium ({SMALL_DATASET} <= {dataset_size} <= {LARGE_DATASET} images)"
        name, fraction = "top", (2 / 3 if similar else 1 / 3)
    what = {
        "last-fc": "retrain only the classifier",
        "full": "fine-tune the whole net",
    }.get(name, f"freeze the first {'two thirds' if (fraction or 0) > 0.5 else 'third'} "
                "of the learnable layers and retrain the rest")
    if dataset_size > LARGE_DATASET:
        reason = f"dataset {size}, whatever its similarity to the pretrained model's: {what} (strategy {name})"
    else:
        data = "similar to" if similar else "different from"
        reason = f"dataset {size}, {data} the pretrained model's: {what} (strategy {name})"
    return name, replace(options, freeze_fraction=fraction), reason
