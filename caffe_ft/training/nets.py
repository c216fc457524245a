"""The nets a solver builds, and what is known of them before any engine runs.

Which train and test nets a ``SolverParameter`` names (as Caffe's
``Solver::InitTrainNet``/``InitTestNets`` pick them), whether pretrained
weights fit them, and why a resumed run might differ from an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.files import load_net
from ..formats.schema import Schema


@dataclass(frozen=True)
class NetSpec:
    """A net the solver builds: its (current-format) parameters and net state."""

    net: Message
    phase: str
    stages: Tuple[str, ...]
    level: int
    source: str


def _state(net: Message, rule: Optional[Message], phase: str) -> Tuple[str, Tuple[str, ...], int]:
    stages = list(net.state.stage) + (list(rule.stage) if rule is not None else [])
    level = rule.level if rule is not None and rule.HasField("level") else net.state.level
    return phase, tuple(stages), level


def solver_nets(solver: Message, schema: Schema,
                load: Optional[Callable[[str], Message]] = None) -> Tuple[NetSpec, List[NetSpec]]:
    """The train net and the test nets, as Solver::InitTrainNet/InitTestNets pick them;
    ``load(path)`` reads the net files the solver names (default: from disk)."""
    def from_disk(path: str) -> Message:
        return load_net(path, schema)

    load = load or from_disk
    generic = None
    if solver.HasField("net"):
        generic, where = load(solver.net), solver.net
    elif solver.HasField("net_param"):
        generic, where = solver.net_param, "net_param"
    if solver.HasField("train_net"):
        train_net, train_where = load(solver.train_net), solver.train_net
    elif solver.HasField("train_net_param"):
        train_net, train_where = solver.train_net_param, "train_net_param"
    elif generic is not None:
        train_net, train_where = generic, where
    else:
        raise CaffeFtError("the solver names no net (net, net_param, train_net or train_net_param)")
    train_rule = solver.train_state if solver.HasField("train_state") else None
    train = NetSpec(train_net, *_state(train_net, train_rule, "TRAIN"), train_where)
    tests = [(net, "test_net_param") for net in solver.test_net_param]
    tests += [(load(path), path) for path in solver.test_net]
    if generic is not None:
        tests += [(generic, where)] * max(0, len(solver.test_iter) - len(tests))
    if len(solver.test_iter) < len(tests) or (generic is None and len(solver.test_iter) != len(tests)):
        raise CaffeFtError(f"test_iter must be given once per test net ({len(tests)} test nets, "
                           f"{len(solver.test_iter)} test_iter)")
    if len(solver.test_state) and len(solver.test_state) != len(tests):
        raise CaffeFtError("test_state must be given once per test net, or not at all")
    specs = []
    for index, (net, where) in enumerate(tests):
        rule = solver.test_state[index] if len(solver.test_state) else None
        specs.append(NetSpec(net, *_state(net, rule, "TEST"), where))
    return train, specs


def nondeterminism(train: NetSpec) -> List[str]:
    """Why a resumed run may differ from an uninterrupted one (random input, Dropout)."""
    from ..net.shapes import filter_layers

    reasons = []
    for layer in filter_layers(train.net, train.phase, train.level, train.stages):
        where = f"layer '{layer.name}'"
        if layer.type == "Dropout":
            reasons.append(f"{where} is Dropout: its random masks are not in the snapshot")
        elif layer.type == "WindowData":
            reasons.append(f"{where} samples windows at random")
        elif layer.type == "ImageData" and layer.image_data_param.shuffle:
            reasons.append(f"{where} shuffles its list (shuffle: true)")
        elif layer.type == "HDF5Data" and layer.hdf5_data_param.shuffle:
            reasons.append(f"{where} shuffles its files (shuffle: true)")
        elif layer.type == "Python" and not len(layer.bottom):
            reasons.append(f"{where} is a Python data layer whose state is unknown")
        if layer.HasField("transform_param"):
            transform = layer.transform_param
            if transform.mirror:
                reasons.append(f"{where} mirrors at random (mirror: true)")
            if transform.crop_size:
                reasons.append(f"{where} crops at random (crop_size in TRAIN)")
    return reasons


InputShapes = Optional[Dict[str, Tuple[int, ...]]]


def check_data(specs: Sequence[NetSpec], folder: str = "") -> int:
    """The pre-flight every engine runs before it starts (unless the caller ran
    it: ``TrainOptions.data_checked``): the ``ImageData`` lists of the nets,
    their images and labels (see :mod:`caffe_ft.data.preflight`), found from
    ``folder`` (the nets' working directory; default this one); the number of
    images seen."""
    from ..data.preflight import check_nets

    return check_nets(((spec.net, spec.phase, spec.level, spec.stages) for spec in specs), folder)


def check_weights(weights: str, schema: Schema, specs: Sequence[NetSpec], err: IO[str],
                  input_shapes: Sequence[InputShapes] = ()) -> Optional[str]:
    """Refuse (print the report, raise) weights that Caffe would abort on when
    copying them into the nets; None when they fit, or why they could not be
    checked (e.g. an input shape that only the data itself tells)."""
    from ..formats.caffemodel import load_model
    from ..net.weights import check, format_check

    model = load_model(weights, schema)
    for index, spec in enumerate(specs):
        shapes = input_shapes[index] if index < len(input_shapes) else None
        try:
            report = check(spec.net, model, spec.phase, input_shapes=shapes, stages=spec.stages, level=spec.level)
        except CaffeFtError as exc:
            return str(exc)
        if not report.ok:
            err.write(format_check(report))
            raise CaffeFtError(f"the weights do not fit the {spec.phase} net ({report.abort}); "
                               "nothing was trained", weights)
    return None
