"""What a fine-tuning job is asked to do, as typed values instead of command-line flags.

The CLI builds these from its options; Python code builds them directly
(``caffe_ft.rewrite(net, RewriteOptions(strategy="last-fc", ...))``).  Each is
frozen: a job never changes what it was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .rewrite import DataOptions, SolverOptions
from .strategies import StrategyOptions

#: ``--input-shape`` values: a data layer's top name -> its N, C, H, W.
InputShapes = Dict[str, Tuple[int, ...]]


@dataclass(frozen=True)
class RewriteOptions:
    """``caffe-ft rewrite``: the strategy, the head, the data, the solver and where to write.

    ``strategy`` ``"auto"`` is decided from ``dataset_size`` (default: the
    lines of ``data.train``) and ``similarity`` (default: measured, which
    needs the pretrained weights and the training data).  ``outdir`` defaults
    to ``ft-STRATEGY`` beside the net.
    """

    head: StrategyOptions
    strategy: str = "auto"
    data: DataOptions = DataOptions()
    solver: SolverOptions = SolverOptions()
    solver_path: Optional[str] = None
    deploy_path: Optional[str] = None
    outdir: Optional[str] = None
    dataset_size: Optional[int] = None
    similarity: Optional[str] = None
    input_shapes: InputShapes = field(default_factory=dict)
    then: str = "full"  # lp-ft: the strategy the fine-tuning after the linear probe follows
    class_weights: Optional[str] = None  # "auto" or a file of one weight per class: InfogainLoss (class_weights.py)


@dataclass(frozen=True)
class FinetuneOptions:
    """``caffe-ft finetune``: a rewrite, then training from the pretrained weights.

    ``device``: ``"cpu"``, ``"solver"`` (the solver's own ``solver_mode``) or
    GPU ids (``"0"``, ``"0,1"``, ``"all"``).  ``cached``: let ``last-fc`` train
    the head on cached features where that gives what pycaffe would.  ``resume``:
    the snapshot a stopped job left (its message names it); the job continues from it.
    ``export_onnx``: also write ``final.onnx``, checked against pycaffe.
    ``engine``: ``pycaffe`` or ``torch``, who trains and computes cached features.
    ``data_workers``: torch: the processes that read each net's data (None: the engine's choice).
    """

    rewrite: RewriteOptions
    device: str = "solver"
    seed: int = 0
    force: bool = False
    cached: bool = True
    resume: Optional[str] = None  # a .solverstate of a stopped run: continue it instead of starting afresh
    keep_best: Optional[str] = None  # a test output: OUTDIR/best.caffemodel keeps the weights of its best test
    patience: Optional[int] = None  # stop after this many tests without a better keep_best value
    export_onnx: bool = False
    engine: str = "pycaffe"
    data_workers: Optional[int] = None
