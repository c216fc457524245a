"""The torch engine's half of :func:`caffe_ft.training.forward.forward_batches`.

A TEST-phase :class:`~caffe_ft.training.torch.net.CaffeNet` of the net runs
each batch in fp32 (TF32 off on a GPU: the features must equal pycaffe's); the
first CUDA device when there is one, else the CPU.  Caffe reshapes its net
for a batch of another size (the last, short one); here a net is built per
batch shape, all of them reading the one copy of the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from google.protobuf.message import Message

from ...errors import CaffeFtError
from ...formats.caffemodel import load_model
from ...formats.schema import Schema
from .net import CaffeNet

if TYPE_CHECKING:
    from ..forward import Batch


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def forward_batches(net: Message, weights: str, input_blob: str, batches: Iterator["Batch"], blobs: Sequence[str],
                    advance: Callable[[int], None], schema: Schema
                    ) -> Iterator[Tuple[Dict[str, np.ndarray], np.ndarray, List[str]]]:
    """For each batch fed to ``input_blob``: copies of ``blobs`` after a forward pass, labels and names."""
    stored = load_model(weights, schema).layer_blobs()
    device = _device()
    nets: Dict[Tuple[int, ...], CaffeNet] = {}
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for data, labels, names in batches:
            shape = tuple(int(size) for size in data.shape)
            module = nets.get(shape)
            if module is None:
                module = CaffeNet(net, "TEST", input_shapes={input_blob: shape})
                missing = [name for name in module.blobs_of if name not in stored]
                if missing:
                    raise CaffeFtError(f"the weights have no layer '{missing[0]}'", weights)
                module.load_blobs(stored)
                module.to(device).eval()
                nets[shape] = module
            with torch.no_grad():
                out = module({input_blob: torch.as_tensor(np.asarray(data, np.float32), device=device)})
            yield {name: out[name].cpu().numpy().astype(np.float32, copy=True) for name in blobs}, labels, names
            advance(len(names))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
