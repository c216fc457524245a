"""Checking an exported ONNX model against pycaffe: the same random input through both.

Used by ``caffe-ft finetune --export-onnx`` to say in its summary how
``final.onnx`` was checked.  pycaffe comes through the pycaffe engine; both
it and onnxruntime are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

TOLERANCE = 1e-4  # relative to the largest magnitude of each output


@dataclass(frozen=True)
class Agreement:
    """The largest difference between ONNX Runtime's and pycaffe's outputs,
    relative to each output's largest magnitude, over ``batches``."""

    difference: float
    batches: Sequence[int]
    runtime: str

    @property
    def ok(self) -> bool:
        return self.difference <= TOLERANCE

    def __str__(self) -> str:
        verdict = "equal" if self.ok else "NOT equal"
        return (f"ONNX Runtime {self.runtime} and pycaffe outputs {verdict} within {TOLERANCE:g} relative "
                f"(largest difference {self.difference:.1e}) on random input at batch "
                + " and ".join(str(batch) for batch in self.batches))


def compare_with_pycaffe(deploy: str, weights: str, model: str, batches: Sequence[int] = (1, 4),
                         seed: int = 0) -> Agreement:
    """Run ``deploy`` with ``weights`` in pycaffe and ``model`` in ONNX Runtime on
    the same inputs (normal noise of standard deviation 50, pixel-like) and
    measure how far their outputs are apart."""
    import onnxruntime

    from ..training.pycaffe import load_caffe_net

    with open(deploy, encoding="utf-8") as handle:
        net = load_caffe_net(handle.read(), weights)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_outputs()]
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in batches:
        feed = {}
        for name in net.inputs:
            shape = (batch, *net.blobs[name].data.shape[1:])
            feed[name] = (50 * rng.standard_normal(shape)).astype(np.float32)
            net.blobs[name].reshape(*shape)
        net.reshape()
        expected = net.forward(**feed)
        for name, got in zip(names, session.run(None, feed)):
            want = expected[name]
            scale = max(float(np.abs(want).max()), 1e-30)
            worst = max(worst, float(np.abs(got - want).max()) / scale if got.shape == want.shape else np.inf)
    return Agreement(worst, tuple(batches), onnxruntime.__version__)
