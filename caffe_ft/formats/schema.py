"""The Caffe schema as Python message classes, kept apart from pycaffe's.

caffe-ft parses a ``caffe.proto`` (its own, or a fork's given with ``--proto``
or ``CAFFE_FT_PROTO``) and loads it into a private descriptor pool.  Because
the pool is private, our ``caffe.NetParameter`` never clashes with the one
pycaffe's ``caffe_pb2`` registers in protobuf's default pool, so both can live
in one process.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Dict, Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import CaffeFtError
from .protofile import parse_proto
from ..resources import resource_dir

PROTO_ENV = "CAFFE_FT_PROTO"


def default_proto_path() -> str:
    """Path of caffe-ft's bundled ``caffe.proto`` (installed or in a checkout)."""
    return os.path.join(resource_dir("proto"), "caffe.proto")


def _message_class(descriptor):  # type: ignore[no-untyped-def]
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:  # protobuf >= 4.21
        return get_class(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def is_repeated(field: FieldDescriptor) -> bool:
    """Whether ``field`` is repeated, on every protobuf runtime (``label`` went in 7.x)."""
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


class Schema:
    """Message classes of one ``caffe.proto``, looked up by short name."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        fdp = _compiled(text, path)
        self.package = fdp.package
        pool = descriptor_pool.DescriptorPool()
        try:
            pool.AddSerializedFile(fdp.SerializeToString())
            self.file = pool.FindFileByName(fdp.name)
        except Exception as exc:  # the pool rejects an inconsistent schema
            raise CaffeFtError(f"invalid schema: {exc}", path) from None
        self._classes: Dict[str, type] = {}

    def message_class(self, name: str) -> type:
        """The class of message ``name`` (``"NetParameter"``, ``"LayerParameter"``…)."""
        cls = self._classes.get(name)
        if cls is None:
            full = f"{self.package}.{name}" if self.package else name
            try:
                descriptor = self.file.pool.FindMessageTypeByName(full)
            except KeyError:
                raise CaffeFtError(
                    f"the schema has no message '{name}'", self.path
                ) from None
            cls = self._classes[name] = _message_class(descriptor)
        return cls

    def new(self, name: str) -> Message:
        """A new, empty message of type ``name``."""
        return self.message_class(name)()

    def descriptor(self, name: str) -> Any:
        """The ``Descriptor`` of message ``name``: its fields by name and number."""
        return getattr(self.message_class(name), "DESCRIPTOR")


def _cache_dir() -> str:
    return os.environ.get("CAFFE_FT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "caffe-ft"
    )


def _compiled(text: str, path: str) -> descriptor_pb2.FileDescriptorProto:
    """``parse_proto(text)``, remembered on disk: parsing Caffe's schema is a
    tenth of a ``caffe-ft fmt`` run, loading the parsed form almost nothing."""
    from ..version import __version__

    key = hashlib.sha256(f"{__version__}\0{path}\0{text}".encode("utf-8")).hexdigest()[:32]
    cached = os.path.join(_cache_dir(), f"schema-{key}.pb")
    try:
        with open(cached, "rb") as handle:
            return descriptor_pb2.FileDescriptorProto.FromString(handle.read())
    except Exception:  # missing or unreadable: parse again
        pass
    fdp = parse_proto(text, path)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached))
        with os.fdopen(fd, "wb") as handle:
            handle.write(fdp.SerializeToString())
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs the parse
    return fdp


_CACHE: Dict[str, Schema] = {}


def load_schema(proto_path: Optional[str] = None) -> Schema:
    """Load (once per path) the schema at ``proto_path``, ``$CAFFE_FT_PROTO`` or ours."""
    path = proto_path or os.environ.get(PROTO_ENV) or default_proto_path()
    schema = _CACHE.get(path)
    if schema is None:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise CaffeFtError(f"cannot read schema: {exc.strerror}", path) from None
        except UnicodeDecodeError:
            raise CaffeFtError("schema is not UTF-8 text", path) from None
        schema = _CACHE[path] = Schema(path, text)
    return schema
