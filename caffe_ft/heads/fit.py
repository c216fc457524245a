"""Training a new head on cached features instead of running the trunk every iteration.

``caffe-ft finetune`` uses it in two ways:

* ``--strategy features`` (the fixed-feature-extractor recipe): the frozen
  trunk runs once over the training and the validation images (TEST-phase
  preprocessing, :mod:`caffe_ft.heads.cache`), scikit-learn fits a multinomial
  logistic regression on the training features (:func:`linear.fit`, ``C`` by
  cross-validation) and scores it on the validation ones; the head's weights
  (standardization folded in) replace the fresh head of ``init.caffemodel``
  in ``final.caffemodel``, which the rewritten train_val and deploy nets load
  as they are.
* ``--strategy last-fc`` when Caffe's run would amount to training the head
  on fixed features (:func:`analyse` says when, or why not): the trunk runs
  once over each image, then :mod:`caffe_ft.heads.replay` performs the solver's
  own SGD iterations on the head (same settings, batches, test passes,
  metrics), which ends with the head pycaffe would have trained.

That needs a head that is the only layer that learns (an InnerProduct read
only by its SoftmaxWithLoss and Accuracy layers), an SGD solver with
``iter_size`` 1 and L2 decay, and a trunk that computes the same features
every time it sees an image: no Dropout or BatchNorm with batch statistics
before the head, no mirroring, no random crop (``crop_size`` with TRAIN is a
random crop, unless it equals ImageData's resized size), no ``rand_skip``, a
single ImageData or Data (LMDB) layer, and the same trunk in TRAIN as in
TEST (features are computed by the TEST-phase trunk).  A shuffled list is
shuffled here with numpy's generator (``random_seed``), not Caffe's: the run
is then one of the runs Caffe could make, not the one it makes.  Training on
a GPU stays with pycaffe, since features are computed on the CPU here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from ..net import graph
from . import replay
from ..data.transform import IMAGE_LAYERS, net_data_layer
from ..errors import CaffeFtError
from ..formats.schema import Schema

if TYPE_CHECKING:
    from .cache import FeatureSet

TRAIN_FEATURES = "features-train.npz"
VAL_FEATURES = "features-val.npz"


@dataclass(frozen=True)
class DataSpec:
    """What one phase's data layer reads."""

    layer: str
    source: str
    batch_size: int
    shuffle: bool


@dataclass(frozen=True)
class Job:
    """A last-fc run that can be trained on cached features."""

    net_path: str
    solver: Message
    head: str
    feature_layer: str  # the layer whose output the head reads
    train: DataSpec
    test: Optional[DataSpec]
    outputs: Tuple[replay.Output, ...]
    sgd: replay.SGD
    loss: replay.Loss


@dataclass
class Trained:
    """How a head training ended."""

    exit_code: int
    final_model: Optional[str]
    test_outputs: Dict[str, float]
    message: str
    notes: List[str] = field(default_factory=list)
    resume_state: Optional[str] = None  # a stopped pycaffe run: the snapshot that continues it


# --------------------------------------------------------------------------
# When the fast path gives what Caffe gives


def _phase_net(net: Message, phase: str, schema: Schema) -> Message:
    """The layers Caffe builds for ``phase``, their phase rules dropped."""
    from ..net.shapes import filter_layers

    out = schema.new("NetParameter")
    out.name = net.name
    for layer in filter_layers(net, phase, net.state.level, list(net.state.stage)):
        copy = out.layer.add()
        copy.CopyFrom(layer)
        copy.ClearField("include")
        copy.ClearField("exclude")
    return out


def _data_spec(layer: Message) -> DataSpec:
    if layer.type == "ImageData":
        param = layer.image_data_param
        return DataSpec(layer.name, param.source, param.batch_size, param.shuffle)
    return DataSpec(layer.name, layer.data_param.source, layer.data_param.batch_size, False)


def data_reasons(layer: Message, phase: str) -> List[str]:
    """Why a data layer does not give the same input for an image every time."""
    where = f"{phase} data layer '{layer.name}'"
    if layer.type not in IMAGE_LAYERS:
        return [f"{where} is {layer.type}; only ImageData and Data are read here"]
    reasons = []
    transform = layer.transform_param
    if transform.mirror:
        reasons.append(f"{where} mirrors at random (mirror: true)")
    image = layer.image_data_param
    resized = layer.type == "ImageData" and image.new_height == image.new_width == transform.crop_size
    if phase == "TRAIN" and transform.crop_size and not resized:
        reasons.append(f"{where} crops at random (crop_size {transform.crop_size} in TRAIN)")
    skip = image.rand_skip if layer.type == "ImageData" else layer.data_param.rand_skip
    if skip:
        reasons.append(f"{where} skips a random number of entries (rand_skip)")
    if layer.type == "Data" and layer.data_param.backend != layer.data_param.LMDB:
        reasons.append(f"{where} reads a LevelDB; only LMDB is read here")
    return reasons


def trunk_reasons(layers: Sequence[Message], trunk: Iterable[int]) -> List[str]:
    """Why the TRAIN-phase layers before the head give other features each time."""
    reasons = []
    for index in sorted(trunk):
        layer = layers[index]
        where = f"layer '{layer.name}'"
        if layer.type == "Dropout":
            reasons.append(f"{where} is Dropout: the features change at every pass")
        elif layer.type == "BatchNorm" and not layer.batch_norm_param.use_global_stats:
            reasons.append(f"{where} normalizes with batch statistics in TRAIN")
        elif layer.type == "Python":
            reasons.append(f"{where} is a Python layer")
    return reasons


def solver_reasons(solver: Message, device: str) -> List[str]:
    """Why the solver's updates of the head are not replayed here (or not worth it, on a GPU)."""
    reasons = []
    kind = solver.type or "SGD"
    if kind != "SGD":
        reasons.append(f"the solver is {kind}; only SGD is replayed")
    if solver.iter_size != 1:
        reasons.append(f"iter_size is {solver.iter_size}")
    if solver.regularization_type != "L2":
        reasons.append(f"regularization_type is {solver.regularization_type}; only L2 is replayed")
    if solver.HasField("train_state") or len(solver.test_state):
        reasons.append("the solver sets train_state/test_state")
    on_gpu = device not in ("cpu", "solver") or (
        device == "solver" and solver.HasField("solver_mode") and solver.solver_mode == solver.GPU)
    if on_gpu:
        reasons.append("training runs on a GPU (features are computed on the CPU here)")
    return reasons


def _multipliers(layer: Message) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    count = graph.param_blob_count(layer)
    specs = [layer.param[i] if i < len(layer.param) else None for i in range(count)]
    return (tuple(spec.lr_mult if spec is not None else 1.0 for spec in specs),
            tuple(spec.decay_mult if spec is not None else 1.0 for spec in specs))


def loss_of(layer: Message) -> replay.Loss:
    """A SoftmaxWithLoss layer's weight, normalization and ignored label."""
    param = layer.loss_param
    names = {value.number: value.name for value in param.DESCRIPTOR.fields_by_name["normalization"].enum_type.values}
    if not param.HasField("normalization") and param.HasField("normalize"):
        normalization = "VALID" if param.normalize else "BATCH_SIZE"
    else:
        normalization = names[param.normalization]
    ignore = param.ignore_label if param.HasField("ignore_label") else None
    return replay.Loss(graph.loss_weight(layer), normalization, ignore)


def _net_outputs(layers: Sequence[Message]) -> List[Tuple[str, int]]:
    """The blobs a net outputs (produced, not read by a later layer) and their producers."""
    available: Dict[str, int] = {}
    for index, layer in enumerate(layers):
        for bottom in layer.bottom:
            available.pop(bottom, None)
        for top in layer.top:
            available[top] = index
    return list(available.items())


def _head_reader_reasons(layer: Message, scores: str, label: str) -> List[str]:
    """Why a layer reading the head's scores is not one replayed here."""
    where = f"layer '{layer.name}' ({layer.type})"
    if layer.type not in ("SoftmaxWithLoss", "Accuracy"):
        return [f"{where} reads the head's output"]
    if list(layer.bottom) != [scores, label]:
        return [f"{where} reads {', '.join(layer.bottom)}, not the scores and the data layer's label"]
    if len(layer.top) != 1:
        return [f"{where} has {len(layer.top)} outputs"]
    axis = layer.softmax_param.axis if layer.type == "SoftmaxWithLoss" else layer.accuracy_param.axis
    return [f"{where} works along axis {axis}"] if axis != 1 else []


def _trunk_text(net: Message, schema: Schema, feature_layer: str) -> Tuple[str, str]:
    """The cut trunk's text and the blob it ends with."""
    from .trunk import cut_net

    trunk = cut_net(net, schema, (1, 1, 1), feature_layer)
    return trunk.text(), trunk.feature_blob


def _head_index(layers: Sequence[Message]) -> Tuple[Optional[int], List[str]]:
    """The one layer that learns, when it is an InnerProduct that can be replayed."""
    learning = [i for i, layer in enumerate(layers) if graph.is_learnable(layer)]
    if len(learning) != 1:
        names = ", ".join(f"'{layers[i].name}'" for i in learning[:4]) or "none"
        return None, [f"{len(learning)} layers learn ({names}); only a lone head is replayed"]
    layer = layers[learning[0]]
    if layer.type != "InnerProduct":
        return None, [f"the head '{layer.name}' is a {layer.type} layer, not InnerProduct"]
    if layer.inner_product_param.axis != 1 or layer.inner_product_param.transpose:
        return None, [f"the head '{layer.name}' sets axis or transpose"]
    return learning[0], []


@dataclass(frozen=True)
class _TrainNet:
    """The parts of the TRAIN net the replay needs."""

    head: Message
    feature_layer: str
    data: Message
    loss: Message


def _train_net(net: Message, schema: Schema) -> Tuple[Optional[_TrainNet], List[str]]:
    """The TRAIN net's head, feature layer, data and loss layers (None when
    they cannot be told apart), and why they cannot be replayed."""
    layers = list(_phase_net(net, "TRAIN", schema).layer)
    head, reasons = _head_index(layers)
    if head is None:
        return None, reasons
    trunk = graph.upstream(layers, [head]) - {head}
    feeds = [i for i in trunk if layers[i].type in graph.DATA_TYPES]
    source = graph.producers(layers)[head][0]
    if len(feeds) != 1 or source is None or source in feeds:
        return None, [f"the head is fed by {len(feeds)} data layers, not by one through a trunk"]
    data = layers[feeds[0]]
    reasons = data_reasons(data, "TRAIN") + trunk_reasons(layers, trunk)
    first = net_data_layer(net, "TRAIN")
    if first is None or first.name != data.name:
        reasons.append(f"data layer '{data.name}' is not the TRAIN net's first image data layer")
    scores, label = layers[head].top[0], data.top[1] if len(data.top) > 1 else ""
    readers = graph.consumers(layers)[head]
    for index in readers:
        reasons += _head_reader_reasons(layers[index], scores, label)
    losses = [i for i in readers if layers[i].type == "SoftmaxWithLoss"]
    others = [layer.name for i, layer in enumerate(layers) if graph.loss_weight(layer) and i not in losses]
    if len(losses) != 1 or others:
        reasons.append(f"the loss is not one SoftmaxWithLoss on the head (other losses: {', '.join(others) or 'none'})")
    if len(losses) != 1:
        return None, reasons
    return _TrainNet(layers[head], layers[source].name, data, layers[losses[0]]), reasons


def _same_trunk(net: Message, schema: Schema, parts: _TrainNet) -> List[str]:
    """Why the TEST-phase trunk (which computes the features) is not the TRAIN one."""
    cut = {}
    for phase in ("TRAIN", "TEST"):
        try:
            cut[phase] = _trunk_text(_phase_net(net, phase, schema), schema, parts.feature_layer)
        except CaffeFtError as exc:
            if phase == "TRAIN":
                return [f"the trunk cannot be cut at '{parts.feature_layer}': {exc}"]
    reasons = []
    if cut.get("TEST") != cut["TRAIN"]:
        reasons.append("the trunk's layers differ between TRAIN and TEST (features are computed in TEST)")
    if cut["TRAIN"][1] != parts.head.bottom[0]:
        reasons.append(f"the head reads '{parts.head.bottom[0]}', not the output of '{parts.feature_layer}'")
    return reasons


def _test_net(net: Message, schema: Schema, scores: str) -> Tuple[Optional[DataSpec], List[replay.Output], List[str]]:
    """The TEST net's data and outputs (each from the head's scores), or why they cannot be replayed."""
    data = net_data_layer(net, "TEST")
    if data is None:
        return None, [], ["the test net has no ImageData or Data layer"]
    reasons = data_reasons(data, "TEST")
    layers = list(_phase_net(net, "TEST", schema).layer)
    label = data.top[1] if len(data.top) > 1 else ""
    outputs = []
    for name, index in _net_outputs(layers):
        layer = layers[index]
        found = _head_reader_reasons(layer, scores, label)
        if found:
            reasons.append(f"test output '{name}': {found[0]}")
        elif layer.type == "Accuracy":
            param = layer.accuracy_param
            outputs.append(replay.Output(name, "accuracy", param.top_k,
                                          param.ignore_label if param.HasField("ignore_label") else None))
        else:
            outputs.append(replay.Output(name, "loss", loss=loss_of(layer)))
    return _data_spec(data), outputs, reasons


def _sgd(solver: Message, head: Message) -> replay.SGD:
    lr_mults, decay_mults = _multipliers(head)
    return replay.SGD(
        base_lr=solver.base_lr, max_iter=solver.max_iter, lr_policy=solver.lr_policy, gamma=solver.gamma,
        power=solver.power, stepsize=solver.stepsize, stepvalue=tuple(solver.stepvalue), momentum=solver.momentum,
        weight_decay=solver.weight_decay, clip_gradients=solver.clip_gradients, lr_mults=lr_mults,
        decay_mults=decay_mults,
    )


def analyse(solver_path: str, schema: Schema, device: str = "cpu") -> Tuple[Optional[Job], List[str]]:
    """The job when training the head on cached features gives what pycaffe
    would train (see the module notes), else None and every reason why not."""
    from ..formats import files
    from ..training.nets import solver_nets
    from ..training.schedule import check_solver
    from ..formats.upgrade import upgrade_solver

    try:
        solver = files.load_text(solver_path, schema, files.SOLVER).message
        upgrade_solver(solver)
        check_solver(solver)
        train_spec, test_specs = solver_nets(solver, schema)
    except CaffeFtError as exc:
        return None, [str(exc)]
    reasons = solver_reasons(solver, device)
    if not solver.HasField("net") or len(test_specs) > 1 or any(spec.source != solver.net for spec in test_specs):
        return None, reasons + ["the solver's nets are not one train_val file with at most one test net"]
    net = train_spec.net
    parts, found = _train_net(net, schema)
    reasons += found
    if parts is None:
        return None, reasons
    reasons += _same_trunk(net, schema, parts)
    test: Optional[DataSpec] = None
    outputs: List[replay.Output] = []
    if test_specs:
        test, outputs, found = _test_net(net, schema, parts.head.top[0])
        reasons += found
    if reasons:
        return None, reasons
    job = Job(solver.net, solver, parts.head.name, parts.feature_layer, _data_spec(parts.data), test,
              tuple(outputs), _sgd(solver, parts.head), loss_of(parts.loss))
    return job, []


# --------------------------------------------------------------------------
# Features


def _features(net_path: str, weights: str, spec: DataSpec, layer: str, phase: Optional[str], path: str,
              schema: Schema, out: IO[str], engine: str = "pycaffe") -> Tuple["FeatureSet", bool]:
    """The features of ``spec``'s data at ``layer``'s output (computed by
    ``engine``, or reused while up to date) and whether they were reused."""
    from .cache import Request, compute_or_reuse

    request = Request(net_path, weights, spec.source, layer, batch_size=max(1, spec.batch_size), phase=phase,
                      engine=engine)
    outcome = compute_or_reuse(request, path, schema)
    verb = "reused" if outcome.reused else f"computed ({outcome.reason})"
    out.write(f"features of {spec.source}: {verb}, {len(outcome.features.labels)} images "
              f"-> {os.path.basename(path)}\n")
    out.flush()
    return outcome.features, outcome.reused


def check_labels(labels: np.ndarray, classes: int, ignored: Sequence[Optional[int]], source: str) -> None:
    """Refuse labels the head has no output for (Caffe reads past its scores)."""
    outside = labels[((labels < 0) | (labels >= classes)) & ~np.isin(labels, [i for i in ignored if i is not None])]
    if outside.size:
        raise CaffeFtError(f"label {int(outside[0])} is outside 0..{classes - 1} (the head has {classes} outputs)",
                           source)


def _head_blobs(schema: Schema, init: str, head: str) -> List[np.ndarray]:
    from ..formats.caffemodel import load_model

    blobs = load_model(init, schema).layer_blobs().get(head)
    if not blobs:
        raise CaffeFtError(f"holds no weights for the head '{head}'", init)
    return [blob.data for blob in blobs]


def save_with_head(schema: Schema, init: str, head: str, blobs: Sequence[np.ndarray], path: str) -> None:
    """``init`` (trunk + fresh head) with the head's blobs replaced, written to ``path``."""
    from ..formats.caffemodel import Blob, load_model, save_model

    model = load_model(init, schema)
    names = [layer.name for layer in model.layers]
    if head not in names:
        raise CaffeFtError(f"has no layer '{head}'", init)
    model.blobs[names.index(head)] = [Blob.of(np.asarray(blob, np.float32)) for blob in blobs]
    save_model(model, path)


# --------------------------------------------------------------------------
# last-fc: Caffe's SGD on cached features


@dataclass
class _Tester:
    """The test net's passes; its data layer reads on from one pass to the next."""

    outputs: Tuple[replay.Output, ...]
    count: int  # test_iter
    features: np.ndarray
    labels: np.ndarray
    batches: Iterator[np.ndarray]

    def run(self, head: replay.Head) -> Dict[str, float]:
        """Each output summed over ``count`` batches in float32, then averaged, as Solver::Test does."""
        from ..training.progress import summarize_outputs

        sums = {output.name: np.float32(0) for output in self.outputs}
        for _ in range(self.count):
            rows = next(self.batches)
            for name, value in replay.batch_outputs(head, self.features[rows], self.labels[rows],
                                                     self.outputs).items():
                sums[name] = np.float32(sums[name] + value)
        outputs = summarize_outputs(list(sums), list(sums.values()), max(self.count, 1))
        return {name: float(value) for name, value in outputs.items()}  # type: ignore[arg-type]


def _ignored_by_all(outputs: Sequence[replay.Output]) -> List[Optional[int]]:
    """The label every test output ignores, if there is one."""
    ignored = {output.ignore_label if output.kind == "accuracy" else output.loss.ignore_label for output in outputs}
    return list(ignored) if len(ignored) == 1 else []


def _forward_counts(job: Job, passes: int, computed: int) -> Tuple[int, str]:
    """Images pycaffe's run sends through the trunk, and the saving in words."""
    tests = passes * job.solver.test_iter[0] * job.test.batch_size if job.test is not None else 0
    pycaffe = job.sgd.max_iter * job.train.batch_size + tests
    saving = f"{pycaffe / computed:.3g}x fewer forward passes" if computed else "cached features reused"
    return pycaffe, saving


def train_cached(job: Job, schema: Schema, init: str, outdir: str, final: str, metrics_path: str, plot_path: str,
                 seed: int, out: IO[str], engine: str = "pycaffe") -> Trained:
    """Replay the solver's SGD on the head over cached features (computed by
    ``engine``), starting from ``init``'s head; write ``final``, the metrics and the plot."""
    from ..training.plot import plot_quietly
    from ..training.progress import MetricsWriter, make_reporter
    from ..training.schedule import final_test_due, learning_rate, test_due
    from ..training.stop import diverged_message

    train, train_reused = _features(job.net_path, init, job.train, job.feature_layer, "TRAIN",
                                    os.path.join(outdir, TRAIN_FEATURES), schema, out, engine)
    head = replay.Head.start(_head_blobs(schema, init, job.head))
    classes, inputs = head.params[0].shape
    x, y = train.matrix, train.labels
    if x.shape[1] != inputs:
        raise CaffeFtError(f"the head '{job.head}' takes {inputs} inputs but the features have {x.shape[1]}")
    check_labels(y, classes, [job.loss.ignore_label], job.train.source)
    seed = job.solver.random_seed if job.solver.random_seed >= 0 else seed
    rng = np.random.default_rng(seed)
    batches = replay.batch_indices(len(y), job.train.batch_size, rng if job.train.shuffle else None)
    tester, computed = None, 0 if train_reused else len(y)
    if job.test is not None:
        val, val_reused = _features(job.net_path, init, job.test, job.feature_layer, "TEST",
                                    os.path.join(outdir, VAL_FEATURES), schema, out, engine)
        check_labels(val.labels, classes, _ignored_by_all(job.outputs), job.test.source)
        computed += 0 if val_reused else len(val.labels)
        tester = _Tester(job.outputs, job.solver.test_iter[0], val.matrix, val.labels,
                         replay.batch_indices(len(val.labels), job.test.batch_size, rng if job.test.shuffle else None))
    solver, sgd = job.solver, job.sgd
    metrics = MetricsWriter(metrics_path)
    reporter = make_reporter(out, 0, sgd.max_iter, solver.display, solver.average_loss)
    last: Dict[str, float] = {}
    passes = 0

    def test(iteration: int) -> None:
        nonlocal last, passes
        if tester is not None:
            last = tester.run(head)
            passes += 1
            reporter.test(iteration, 0, last)
            metrics.test(iteration, 0, last)

    diverged: Optional[Tuple[int, float, float]] = None
    started = time.monotonic()
    try:
        while head.iteration < sgd.max_iter:
            iteration = head.iteration
            if test_due(solver, iteration):
                test(iteration)
            rows = next(batches)
            loss = replay.step(head, x[rows], y[rows], sgd, job.loss)
            lr = learning_rate(sgd, iteration)
            metrics.train(iteration, loss, lr)
            if not math.isfinite(loss):
                diverged = (iteration, loss, lr)
                break
            reporter.train(iteration, loss, lr)
        if diverged is None and final_test_due(solver, head.iteration):
            test(head.iteration)
    finally:
        reporter.close()
        metrics.close()
    seconds = time.monotonic() - started
    plot_quietly(metrics_path, plot_path, out)
    if diverged is not None:
        iteration, loss, lr = diverged
        return Trained(2, None, last, diverged_message(loss, iteration, sgd.base_lr, lr))
    save_with_head(schema, init, job.head, head.params, final)
    pycaffe, saving = _forward_counts(job, passes, computed)
    notes = [f"trained the head '{job.head}' on cached features ({saving}): the trunk ran over {computed} images, "
             f"pycaffe would have run it over {pycaffe}; same SGD settings, batches and test passes "
             f"({head.iteration} iterations in {seconds:.3g} s)"]
    if job.train.shuffle or (job.test is not None and job.test.shuffle):
        notes.append(f"shuffled lists are shuffled with numpy's generator (seed {seed}), not Caffe's: "
                     "the batches differ from the ones pycaffe would draw")
    return Trained(0, final, last, f"trained the head on cached features ({saving}) to iteration "
                   f"{head.iteration}; model {final}", notes)


# --------------------------------------------------------------------------
# features: scikit-learn on cached features


def _fit_head_layer(net: Message, schema: Schema, head: str) -> Tuple[Message, str]:
    """The head (an InnerProduct with a bias) and the layer whose output it reads, in TEST."""
    test = _phase_net(net, "TEST", schema)
    layers, index = list(test.layer), graph.layer_index(test, head)
    layer = layers[index]
    if layer.type != "InnerProduct" or layer.inner_product_param.axis != 1 or layer.inner_product_param.transpose:
        raise CaffeFtError(f"--strategy features fits an InnerProduct head on flat features; '{head}' is a "
                           f"{layer.type} layer of another kind (use --strategy last-fc)")
    if graph.param_blob_count(layer) != 2:
        raise CaffeFtError(f"--strategy features needs a head with a bias; '{head}' has bias_term: false")
    if layer.inner_product_param.num_output < 2:
        raise CaffeFtError("--strategy features needs at least 2 classes")
    source = graph.producers(layers)[index][0]
    if source is None or layers[source].type in graph.DATA_TYPES:
        raise CaffeFtError(f"the head '{head}' reads the input directly: there are no features to cache")
    return layer, layers[source].name


def fit_features(net_path: str, schema: Schema, head: str, init: str, outdir: str, final: str, seed: int,
                 out: IO[str], engine: str = "pycaffe") -> Trained:
    """Fit the head with scikit-learn on cached features (TEST-phase
    preprocessing, computed by ``engine``) of the TRAIN and TEST data layers' images; write ``final``."""
    from . import linear
    from ..formats.files import load_net

    net = load_net(net_path, schema)
    layer, feature_layer = _fit_head_layer(net, schema, head)
    sets = []
    for phase, name in (("TRAIN", TRAIN_FEATURES), ("TEST", VAL_FEATURES)):
        data = net_data_layer(net, phase)
        if data is None:
            raise CaffeFtError(f"--strategy features needs a {phase} ImageData or Data layer "
                               "(give --train-data and --val-data)", net_path)
        sets.append(_features(net_path, init, _data_spec(data), feature_layer, None, os.path.join(outdir, name),
                              schema, out, engine)[0])
    train, val = sets
    if train.meta["blob"] != layer.bottom[0]:
        raise CaffeFtError(f"the head reads '{layer.bottom[0]}', not the trunk's output '{train.meta['blob']}'")
    fitted = linear.fit(train, layer.inner_product_param.num_output, "logreg", None, val, folds=5, seed=seed)
    save_with_head(schema, init, head, [fitted.weights, fitted.bias], final)
    out.write(fitted.report())
    chosen = ", ".join(f"C={c:g}: {acc:.3f}" for c, acc in fitted.cv_scores.items())
    notes = [
        f"fitted the head '{head}' with scikit-learn (logistic regression, C = {fitted.C:g}"
        + (f" chosen by {fitted.folds}-fold cross-validation: {chosen}" if chosen else "")
        + f") on cached features of '{train.meta['blob']}' ({fitted.n_train} training, {fitted.n_val} "
        "validation images); the solver was not run",
        f"training accuracy {fitted.train_accuracy:.4f}, validation accuracy {fitted.val_accuracy:.4f}",
        *fitted.notes,
    ]
    return Trained(0, final, {"accuracy": fitted.val_accuracy}, f"fitted the head on cached features: validation "
                   f"accuracy {fitted.val_accuracy:.4f}; model {final}", notes)
