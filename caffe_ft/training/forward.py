"""Forward passes of a TEST net over batches, through either engine.

The feature cache (:mod:`caffe_ft.heads.cache`) and evaluation need only
"these blobs after a forward pass of this net over these batches"; which
engine computes them is a choice (``--engine``), not a difference in the
result: the torch engine computes what pycaffe computes within 1e-4
relative.  :func:`forward_batches` hides the choice; each engine's half lives
with that engine (:func:`caffe_ft.training.pycaffe.forward_batches`,
:func:`caffe_ft.training.torch.forward.forward_batches`), imported only when
chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

from google.protobuf.message import Message

from ..formats.schema import Schema

if TYPE_CHECKING:
    import numpy as np

#: A batch: images (N, C, H, W), their labels and their names.
Batch = Tuple["np.ndarray", "np.ndarray", List[str]]


def forward_batches(engine: str, net: Message, weights: str, input_blob: str, batches: Iterable[Batch],
                    blobs: Sequence[str], advance: Callable[[int], None], schema: Schema
                    ) -> Iterator[Tuple[Dict[str, "np.ndarray"], "np.ndarray", List[str]]]:
    """For each batch fed to ``input_blob`` of the TEST net ``net`` with
    ``weights``: copies of ``blobs`` after a forward pass, the labels and names.

    ``engine`` is ``pycaffe`` or ``torch`` (``auto`` is resolved by the caller,
    who says which it picked)."""
    if engine == "torch":
        from .torch import require_torch

        require_torch()
        from .torch.forward import forward_batches as torch_forward

        return torch_forward(net, weights, input_blob, iter(batches), blobs, advance, schema)
    if engine != "pycaffe":
        raise ValueError(f"unknown engine {engine!r}")
    from ..formats.prototext import print_message
    from .pycaffe import forward_batches as caffe_forward, load_caffe_net

    return caffe_forward(load_caffe_net(print_message(net), weights), input_blob, iter(batches), blobs, advance)
