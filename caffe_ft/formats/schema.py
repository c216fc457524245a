"""The Caffe schema as Python message classes, kept apart from pycaffe's.

caffe-ft parses a ``caffe.proto`` (its own, or a fork's given with ``--proto``
or ``CAFFE_FT_PROTO``) and loads it into a private descriptor pool.  Because
the pool is private, our ``caffe.NetParameter`` never clashes with the one
pycaffe's ``caffe_pb2`` registers in protobuf's default pool, so both can live
in one process.
"""

from __future__ import annotations

import marshal
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import CaffeFtError
from ..resources import resource_dir

try:  # hashlib's own BLAKE2, built into CPython: importing hashlib loads OpenSSL (~3 ms of every start)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter built without it
    from hashlib import blake2b

if TYPE_CHECKING:
    from google.protobuf.message import Message

PROTO_ENV = "CAFFE_FT_PROTO"


class FD:
    """Protobuf's ``FieldDescriptor`` type and label numbers (fixed by descriptor.proto),
    so that the text format can be checked without importing protobuf."""

    TYPE_DOUBLE, TYPE_FLOAT, TYPE_INT64, TYPE_UINT64, TYPE_INT32, TYPE_FIXED64 = 1, 2, 3, 4, 5, 6
    TYPE_FIXED32, TYPE_BOOL, TYPE_STRING, TYPE_GROUP, TYPE_MESSAGE, TYPE_BYTES = 7, 8, 9, 10, 11, 12
    TYPE_UINT32, TYPE_ENUM, TYPE_SFIXED32, TYPE_SFIXED64, TYPE_SINT32, TYPE_SINT64 = 13, 14, 15, 16, 17, 18
    LABEL_REPEATED = 3


def default_proto_path() -> str:
    """Path of caffe-ft's bundled ``caffe.proto`` (installed or in a checkout)."""
    return os.path.join(resource_dir("proto"), "caffe.proto")


def _upb() -> Any:
    """upb's extension module when it is protobuf's runtime (protobuf >= 4.21), else None.

    Under upb, ``descriptor_pool.DescriptorPool()`` is this module's pool and a
    message class is its ``MessageMeta`` over ``message.Message``; what
    ``descriptor_pool`` and ``message_factory`` import to say so (the pure
    Python message machinery, the text format, pickle: ~7 ms) only serves the
    pure Python runtime, and ``inspect``/``diff``/``rewrite`` start ~8 % faster
    without it.  Other runtimes (3.x's C++ or pure Python one) take the public path.
    """
    from google.protobuf.internal import api_implementation

    if api_implementation.Type() != "upb":
        return None
    module = getattr(api_implementation, "_c_module", None)
    return module if hasattr(module, "DescriptorPool") and hasattr(module, "MessageMeta") else None


def _new_pool() -> Any:
    """A new, private descriptor pool."""
    upb = _upb()
    if upb is not None:
        return upb.DescriptorPool()
    from google.protobuf import descriptor_pool

    return descriptor_pool.DescriptorPool()


_UPB_CLASSES: List[type] = []


def _message_class(descriptor):  # type: ignore[no-untyped-def]
    upb = _upb()
    if upb is not None:  # what message_factory.GetMessageClass does under upb
        from google.protobuf import message

        cached = getattr(descriptor, "_concrete_class", None)
        if cached is not None:
            return cached
        made = upb.MessageMeta(descriptor.name, (message.Message,), {"DESCRIPTOR": descriptor, "__module__": None})
        # Held for the process's life, with every sub-message's class, as
        # message_factory holds them: upb 4.21 frees a class nothing else
        # holds and then crashes on the messages of its type.
        _UPB_CLASSES.append(made)
        for field in descriptor.fields:
            if field.message_type is not None:
                _message_class(field.message_type)
        return made
    from google.protobuf import message_factory

    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:  # protobuf >= 4.21
        return get_class(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def is_repeated(field: Any) -> bool:
    """Whether ``field`` is repeated, on every protobuf runtime (``label`` went in 7.x)."""
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return field.label == FD.LABEL_REPEATED  # type: ignore[no-any-return]


# ------------------------------------------------------------ field tables --
#
# ``fmt`` only checks a text file against the schema and prints it; building
# protobuf's descriptor pool and message classes (and importing protobuf) was
# a third of its run.  A field table (names, numbers, types, enum values) is
# derived from the pool once, cached next to the parsed schema, and gives the
# text converter the same answers as the descriptors, through the same names.
# The cache holds it in ``marshal``'s format, as Python's own ``__pycache__``
# holds code: loading it takes a twentieth of ``json.loads``'s time (4 ms), and
# a file that does not load is derived again.


class TableEnum:
    """An enum type: ``values`` in declaration order, by name and by number."""

    def __init__(self, full_name: str, values: List[Tuple[str, int]], by_number: List[Tuple[int, str]]) -> None:
        self.full_name = full_name
        self.values = [TableEnumValue(name, number) for name, number in values]
        self.values_by_name = {value.name: value for value in self.values}
        self.values_by_number = {number: self.values_by_name[name] for number, name in by_number}


class TableEnumValue:
    __slots__ = ("name", "number")

    def __init__(self, name: str, number: int) -> None:
        self.name, self.number = name, number


class TableField:
    """One field, with the attributes of a ``FieldDescriptor`` that the text format reads."""

    __slots__ = ("name", "number", "type", "is_repeated", "message_type", "enum_type")

    def __init__(self, name: str, number: int, type_: int, repeated: bool) -> None:
        self.name, self.number, self.type, self.is_repeated = name, number, type_, repeated
        self.message_type: Optional[TableMessage] = None
        self.enum_type: Optional[TableEnum] = None


class TableMessage:
    """One message type: ``fields_by_name`` and ``full_name``, as on a ``Descriptor``."""

    def __init__(self, name: str, full_name: str) -> None:
        self.name, self.full_name = name, full_name
        self.fields_by_name: Dict[str, TableField] = {}


def _table_of(pool_file: Any) -> Dict[str, Any]:
    """The JSON-able field table of every message and enum in a ``FileDescriptor``."""
    messages: Dict[str, Any] = {}
    enums: Dict[str, Any] = {}

    def enum(descriptor: Any) -> None:
        enums[descriptor.full_name] = [
            [[value.name, value.number] for value in descriptor.values],
            [[number, value.name] for number, value in descriptor.values_by_number.items()],
        ]

    def message(descriptor: Any) -> None:
        fields = []
        for field in descriptor.fields:
            link = field.message_type or field.enum_type
            fields.append([field.name, field.number, field.type, is_repeated(field), link and link.full_name])
        messages[descriptor.full_name] = [descriptor.name, fields]
        for nested in descriptor.nested_types:
            message(nested)
        for nested in descriptor.enum_types:
            enum(nested)

    for descriptor in pool_file.message_types_by_name.values():
        message(descriptor)
    for descriptor in pool_file.enum_types_by_name.values():
        enum(descriptor)
    return {"package": pool_file.package, "messages": messages, "enums": enums}


def _tables(data: Dict[str, Any]) -> Dict[str, TableMessage]:
    """Linked :class:`TableMessage` objects by full name, from :func:`_table_of`'s form."""
    enums = {name: TableEnum(name, [(v, n) for v, n in values], [(n, v) for n, v in by_number])
             for name, (values, by_number) in data["enums"].items()}
    messages = {full: TableMessage(name, full) for full, (name, _) in data["messages"].items()}
    for full, (_, fields) in data["messages"].items():
        table = messages[full]
        for name, number, type_, repeated, link in fields:
            field = table.fields_by_name[name] = TableField(name, number, type_, repeated)
            if link is not None:
                if type_ == FD.TYPE_ENUM:
                    field.enum_type = enums[link]
                else:
                    field.message_type = messages[link]
    return messages


class Schema:
    """Message classes of one ``caffe.proto``, looked up by short name.

    The descriptor pool is built on first use of a message class; a schema
    whose field table is cached (see :meth:`table`) needs no protobuf at all
    until then.  A schema that protobuf rejects never gets a cached table, so
    it is rejected here, at construction, every time.
    """

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self._text = text
        self._file: Any = None
        self._classes: Dict[str, type] = {}
        key = _cache_key(text, path)
        self._table_path = os.path.join(_cache_dir(), f"fields-{key}.marshal")
        cached = _read_table(self._table_path)
        if cached is None:
            data = _table_of(self.file)
            _write_cache(self._table_path, marshal.dumps(data))
            cached = data["package"], _tables(data)
        self.package: str = cached[0]
        self._tables = cached[1]

    @property
    def file(self) -> Any:
        """The schema's protobuf ``FileDescriptor``, in a private pool (built on first use)."""
        if self._file is None:
            for cached in (True, False):  # a damaged cache file: parse again
                name, serialized = _compiled(self._text, self.path, cached)
                pool = _new_pool()
                try:
                    pool.AddSerializedFile(serialized)
                    self._file = pool.FindFileByName(name)
                    break
                except Exception as exc:  # the pool rejects an inconsistent schema
                    if not cached:
                        raise CaffeFtError(f"invalid schema: {exc}", self.path) from None
        return self._file

    def _full_name(self, name: str) -> str:
        return f"{self.package}.{name}" if self.package else name

    def table(self, name: str) -> TableMessage:
        """The field table of message ``name``: what a ``Descriptor`` tells the text
        format (``fields_by_name``, each field's number, type, enum values...), without protobuf."""
        table = self._tables.get(self._full_name(name))
        if table is None:
            raise CaffeFtError(f"the schema has no message '{name}'", self.path)
        return table

    def message_class(self, name: str) -> type:
        """The class of message ``name`` (``"NetParameter"``, ``"LayerParameter"``…)."""
        cls = self._classes.get(name)
        if cls is None:
            try:
                descriptor = self.file.pool.FindMessageTypeByName(self._full_name(name))
            except KeyError:
                raise CaffeFtError(
                    f"the schema has no message '{name}'", self.path
                ) from None
            cls = self._classes[name] = _message_class(descriptor)
        return cls

    def new(self, name: str) -> Message:
        """A new, empty message of type ``name``."""
        return self.message_class(name)()  # type: ignore[no-any-return]

    def descriptor(self, name: str) -> Any:
        """The ``Descriptor`` of message ``name``: its fields by name and number."""
        return getattr(self.message_class(name), "DESCRIPTOR")


def _cache_dir() -> str:
    return os.environ.get("CAFFE_FT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "caffe-ft"
    )


def _cache_key(text: str, path: str) -> str:
    """The name of ``text``'s cache files: caffe-ft's version, the format of the
    field table and the schema's path and text (an edited schema gets new files)."""
    from ..version import __version__

    key = f"{__version__}\0marshal {marshal.version}\0{path}\0{text}"
    return blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _read_table(path: str) -> Optional[Tuple[str, Dict[str, TableMessage]]]:
    """The package and linked field tables cached at ``path``; None when the file
    is missing, unreadable or damaged (the table is then derived and written again)."""
    try:
        with open(path, "rb") as handle:
            data = marshal.loads(handle.read())
        return str(data["package"]), _tables(data)
    except Exception:  # missing, unreadable, truncated, another marshal format, not a table: derive it again
        return None


def _write_cache(path: str, data: bytes) -> None:
    """Write a cache file atomically; a read-only home only costs the work again."""
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


def _compiled(text: str, path: str, cached: bool = True) -> Tuple[str, bytes]:
    """The file name and serialized ``FileDescriptorProto`` of ``parse_proto(text)``,
    remembered on disk: parsing Caffe's schema is a tenth of a ``caffe-ft fmt``
    run, loading the parsed form almost nothing (its name is the first field,
    so not even ``descriptor_pb2`` is imported to read it back)."""
    cache = os.path.join(_cache_dir(), f"schema-{_cache_key(text, path)}.pb")
    try:
        with open(cache, "rb") as handle:
            serialized = handle.read() if cached else b""
        name = _leading_name(serialized)
        if name is not None:
            return name, serialized
    except OSError:  # missing or unreadable: parse again
        pass
    from .protofile import parse_proto  # only on a cache miss: the parser's import is a few ms

    fdp = parse_proto(text, path)
    serialized = fdp.SerializeToString()
    _write_cache(cache, serialized)
    return fdp.name, serialized


def _leading_name(serialized: bytes) -> Optional[str]:
    """``FileDescriptorProto.name`` (field 1, a string) when the bytes start with
    it, as protobuf's serializer writes it; None for anything else (parse again)."""
    from .wire import BYTES, Corrupt, read_record

    try:
        record = read_record(serialized, 0, len(serialized)) if serialized else None
        if record is None or record.field != 1 or record.wire != BYTES:
            return None
        return serialized[record.value_start:record.end].decode("utf-8")
    except (Corrupt, UnicodeDecodeError):
        return None


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
