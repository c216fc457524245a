"""Features of a frozen trunk, computed once and cached in a ``.npz`` file.

Training only a new classifier on a pretrained net (the "fixed feature
extractor" recipe) does not need Caffe's solver: every image goes through the
frozen layers once (:mod:`caffe_ft.heads.trunk` cuts them out, pycaffe or the
torch engine runs them over :mod:`caffe_ft.data`'s transformed batches through
:mod:`caffe_ft.training.forward`), and a linear model learns from the stored
outputs (:mod:`caffe_ft.heads.linear`).  The engine is recorded in the archive
but is no fingerprint: the two agree within 1e-4.

:func:`compute_or_reuse` writes a compressed archive holding the features,
labels, image sources and fingerprints of everything they depend on, and
reuses an existing archive only while every fingerprint still matches.

Fingerprints are SHA-256 digests: of the cut net's text (so editing layers
the features do not depend on, such as the old head, keeps the cache), of the
whole weights file (read in 1 MiB chunks: it costs less than one forward batch
of the net it holds), of the image list's bytes together with each image's
size and mtime (an LMDB: its ``data.mdb`` size and mtime, since any write
rewrites it), of the layer choice and of the transform, mean file included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..data.sources import DataSource, input_shape
from ..data.transform import Transform, default_transform, mean_array, net_root_folder, override
from ..errors import CaffeFtError
from ..formats.files import load_net, sha256_file
from ..formats.schema import Schema
from .trunk import Trunk, cut_net

if TYPE_CHECKING:  # heavy imports stay out of `caffe-ft --help`
    import numpy as np

FORMAT = "caffe-ft-features/1"


def stale_parts(stored: Dict[str, str], current: Dict[str, str]) -> List[str]:
    """The names of the fingerprints that differ (or exist on one side only)."""
    return sorted(name for name in set(stored) | set(current) if stored.get(name) != current.get(name))


# --------------------------------------------------------------------------
# The data transform


# --------------------------------------------------------------------------
# Data sources


# --------------------------------------------------------------------------
# Cutting the net


# --------------------------------------------------------------------------
# Running the trunk


# --------------------------------------------------------------------------
# The cache


@dataclass
class FeatureSet:
    """Features (N x feature shape, float32), labels, sources and what they came from."""

    features: "np.ndarray"
    labels: "np.ndarray"
    sources: "np.ndarray"
    meta: Dict[str, Any]

    @property
    def matrix(self) -> "np.ndarray":
        """One row per example, flattened in C order as InnerProduct flattens from axis 1."""
        return self.features.reshape(len(self.features), -1)


def save_features(path: str, features: FeatureSet) -> None:
    """Write a compressed archive atomically (temp file, rename)."""
    import numpy as np

    from ..formats.files import atomic_output

    with atomic_output(path) as handle:
        np.savez_compressed(
            handle, features=features.features, labels=features.labels,
            sources=np.asarray(features.sources, dtype=str), meta=np.asarray(json.dumps(features.meta)),
        )


def load_features(path: str) -> FeatureSet:
    """Read an archive written by :func:`save_features`."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            loaded = FeatureSet(archive["features"], archive["labels"], archive["sources"], meta)
    except FileNotFoundError:
        raise CaffeFtError("no such file", path) from None
    except (OSError, ValueError, KeyError) as exc:
        raise CaffeFtError(f"not a caffe-ft features file ({exc})", path) from None
    if loaded.meta.get("format") != FORMAT:
        raise CaffeFtError(f"not a caffe-ft features file (format {loaded.meta.get('format')!r})", path)
    return loaded


@dataclass(frozen=True)
class Request:
    """Everything a feature file depends on."""

    net_path: str
    weights: str
    data: str
    layer: Optional[str] = None
    root_folder: Optional[str] = None  # None: the net's image_data_param.root_folder
    transform: Dict[str, Any] = field(default_factory=dict)  # overrides of the net's transform
    batch_size: int = 32
    phase: Optional[str] = None  # whose data layer gives the transform (default: TEST, else TRAIN)
    engine: str = "pycaffe"  # who runs the trunk: pycaffe or torch (equal within 1e-4: not a fingerprint)


@dataclass
class Prepared:
    """A request resolved: trunk, transform, data source and their fingerprints."""

    trunk: Trunk
    transform: Transform
    mean: Optional["np.ndarray"]
    source: DataSource
    fingerprints: Dict[str, str]
    net_path: str


def prepare(request: Request, schema: Schema) -> Prepared:
    """Resolve the trunk, the transform and the data, and fingerprint them."""
    net = load_net(request.net_path, schema)
    transform = override(default_transform(net, request.phase), **request.transform)
    mean = mean_array(transform, schema)
    root = request.root_folder if request.root_folder is not None else net_root_folder(net, request.phase)
    source = DataSource.open(request.data, root)
    shape = input_shape(source, schema, transform, mean)
    try:
        trunk = cut_net(net, schema, shape, request.layer, request.batch_size)
    except CaffeFtError as exc:
        raise exc.located(request.net_path) from None
    fingerprints = {
        "layer": f"{trunk.layer} -> {trunk.feature_blob}",
        "trunk": trunk.fingerprint(),
        "weights": sha256_file(request.weights),
        "data": source.fingerprint(),
        "transform": transform.fingerprint(),
    }
    return Prepared(trunk, transform, mean, source, fingerprints, request.net_path)


def extract(prepared: Prepared, weights: str, schema: Schema, batch_size: int, engine: str = "pycaffe") -> FeatureSet:
    """Run the trunk over the whole data source, through ``engine`` (pycaffe or torch)."""
    import numpy as np

    from ..training.forward import forward_batches
    from ..training.progress import count_progress

    trunk, source = prepared.trunk, prepared.source
    advance = count_progress(len(source), f"features {trunk.feature_blob}")
    parts, labels, names = [], [], []
    batches = source.batches(schema, prepared.transform, prepared.mean, batch_size)
    outputs = forward_batches(engine, trunk.net, weights, trunk.input_blob, batches, [trunk.feature_blob], advance,
                              schema)
    for blobs, batch_labels, batch_names in outputs:
        parts.append(blobs[trunk.feature_blob])
        labels.append(batch_labels)
        names.extend(batch_names)
    features = np.concatenate(parts).astype(np.float32, copy=False)
    meta = {
        "format": FORMAT,
        "net": os.path.abspath(prepared.net_path),
        "weights": os.path.abspath(weights),
        "data": os.path.abspath(source.path),
        "layer": trunk.layer,
        "blob": trunk.feature_blob,
        "input_blob": trunk.input_blob,
        "input_shape": list(trunk.net.layer[0].input_param.shape[0].dim[1:]),
        "transform": prepared.transform.describe(),
        "engine": engine,
        "fingerprints": prepared.fingerprints,
    }
    return FeatureSet(features, np.concatenate(labels), np.asarray(names, dtype=str), meta)


@dataclass(frozen=True)
class CacheResult:
    """What :func:`compute_or_reuse` did: ``reused``, or recomputed with the reason."""

    features: FeatureSet
    reused: bool
    reason: str


def compute_or_reuse(request: Request, output: str, schema: Schema, force: bool = False) -> CacheResult:
    """The features of ``request``, from ``output`` when it is up to date,
    otherwise computed and written there."""
    prepared = prepare(request, schema)
    reason = "forced" if force else "no features file yet"
    if not force and os.path.exists(output):
        try:
            cached = load_features(output)
        except CaffeFtError as exc:
            reason = f"unreadable ({exc.message})"
        else:
            stale = stale_parts(cached.meta.get("fingerprints", {}), prepared.fingerprints)
            if not stale:
                return CacheResult(cached, True, "up to date")
            reason = "stale: " + ", ".join(f"{part} changed" for part in stale)
    result = extract(prepared, request.weights, schema, request.batch_size, request.engine)
    save_features(output, result)
    return CacheResult(result, False, reason)
