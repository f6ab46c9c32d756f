"""A small pure-Python reader for R's XDR serialization and lazy-load databases (``.rdx``/``.rdb``).

R packages ship their data sets as lazy-load databases; reading them without R lets us turn CRAN text packages
(janeaustenr) into corpora. Supported: serialization format versions 2 and 3 in XDR (big-endian binary) form, the
common SEXP types (NULL, symbols, pairlists, lists, character/integer/logical/double/complex/raw vectors,
environments, language objects and closures, references), attributes, and the ALTREP forms R writes for compact
sequences and wrappers. Byte-code and unknown types raise :class:`RDataError` naming the type.

Python representation: ``NULL`` -> ``None``; vectors and pairlists -> :class:`RVector` (a ``list`` carrying
``rtype`` and ``attributes``); ``NA`` -> ``None`` (``nan`` for doubles); symbols -> :class:`RSymbol`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfilters.errors import DatasetUnavailableError


class RDataError(DatasetUnavailableError):
    """R serialized data that this reader cannot decode (corrupt, truncated, or an unsupported feature)."""


# SEXP type codes (R's Rinternals.h) and the serialization-only pseudo types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP, SPECIALSXP, BUILTINSXP, CHARSXP = range(10)
LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
BCREPREF, BCREPDEF, GENERICREFSXP, CLASSREFSXP, PERSISTSXP = 243, 244, 245, 246, 247
PACKAGESXP, NAMESPACESXP, BASENAMESPACE_SXP, MISSINGARG_SXP = 248, 249, 250, 251
UNBOUNDVALUE_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 252, 253, 254, 255

_TYPE_NAMES = {
    LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex", STRSXP: "character",
    VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw", LISTSXP: "pairlist", LANGSXP: "language",
    CLOSXP: "closure", PROMSXP: "promise", DOTSXP: "dots", S4SXP: "S4",
}  # fmt: skip
_SPECIAL_VALUES = {
    BASEENV_SXP: "baseenv", EMPTYENV_SXP: "emptyenv", GLOBALENV_SXP: "globalenv", UNBOUNDVALUE_SXP: "unbound",
    MISSINGARG_SXP: "missingarg", BASENAMESPACE_SXP: "basenamespace",
}  # fmt: skip
_NA_INTEGER = -(2**31)
# CHARSXP "levels" encoding bits
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name), e.g. an attribute or list tag."""

    name: str


@dataclass(frozen=True)
class RSpecial:
    """A singleton R value with no Python equivalent (global environment, missing argument, builtin, ...)."""

    what: str


@dataclass(eq=False)
class REnvironment:
    """An R environment; kept opaque (frame contents are available but rarely needed for data)."""

    locked: bool = False
    enclosure: Any = None
    frame: Any = None
    hashtab: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RReference:
    """A persistent reference (``PERSISTSXP``/package/namespace) by name; resolved by the caller if needed."""

    kind: str
    names: tuple[str | None, ...]


class RVector(list):
    """An R vector or pairlist as a Python list, with its R type name and attributes (``names``, ``class``...)."""

    def __init__(self, rtype: str, values: Any = (), attributes: dict[str, Any] | None = None) -> None:
        super().__init__(values)
        self.rtype = rtype
        self.attributes: dict[str, Any] = attributes or {}

    @property
    def names(self) -> list[str | None] | None:
        names = self.attributes.get("names")
        return list(names) if names is not None else None

    def as_dict(self) -> dict[str | None, Any]:
        """Elements by name (for named lists); raises if the vector has no names."""
        if self.names is None:
            raise RDataError(f"R {self.rtype} vector has no names")
        return dict(zip(self.names, self, strict=True))

    def __repr__(self) -> str:
        preview = list.__repr__(self[:5])[:-1] + (", ...]" if len(self) > 5 else "]")
        return f"RVector({self.rtype!r}, len={len(self)}, {preview}, attributes={sorted(self.attributes)})"


def unserialize(data: bytes) -> Any:
    """Decode one R object from an uncompressed serialization stream (``serialize()``/``saveRDS`` payload)."""
    return _Unserializer(data).read()


def read_rds(data: bytes) -> Any:
    """Decode ``saveRDS`` output, which may be gzip, bzip2 or xz compressed (R's default is gzip)."""
    return unserialize(_decompress_container(data))


def _decompress_container(data: bytes) -> bytes:
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as err:
        raise RDataError(f"corrupt compressed R data: {err}") from None
    return data


class LazyLoadDB:
    """Read-only access to an R lazy-load database: ``LazyLoadDB(Path(".../data/Rdata"))`` reads ``Rdata.rdx``
    (the index: object name -> (offset, length) into ``.rdb``) and fetches objects from ``Rdata.rdb`` on demand."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        index_path = self.base.with_suffix(".rdx")
        try:
            index = read_rds(index_path.read_bytes())
        except OSError as err:
            raise RDataError(f"{index_path}: cannot read ({err.strerror})") from None
        if not isinstance(index, RVector) or index.names is None or "variables" not in index.names:
            raise RDataError(f"{index_path}: not a lazy-load index (no 'variables' element)")
        parts = index.as_dict()
        variables = parts["variables"]
        self._keys: dict[str, tuple[int, int]] = {}
        for name, key in zip(variables.names or [], variables, strict=True):
            if name is None or not isinstance(key, RVector) or len(key) != 2:
                raise RDataError(f"{index_path}: malformed entry for {name!r}")
            self._keys[name] = (int(key[0]), int(key[1]))
        compressed = parts.get("compressed")
        self.compression = int(compressed[0]) if isinstance(compressed, RVector) and compressed else 0

    @property
    def names(self) -> list[str]:
        """Object names stored in the database, in index order."""
        return list(self._keys)

    def raw_record(self, name: str) -> bytes:
        """The stored (still compressed) bytes of object ``name``."""
        offset, length = self._keys[name]
        with open(self.base.with_suffix(".rdb"), "rb") as handle:
            handle.seek(offset)
            record = handle.read(length)
        if len(record) != length:
            raise RDataError(f"{self.base}.rdb: record {name!r} is truncated")
        return record

    def __getitem__(self, name: str) -> Any:
        if name not in self._keys:
            raise KeyError(name)
        return unserialize(decompress_record(self.raw_record(name), self.compression, where=f"{self.base}:{name}"))


def decompress_record(record: bytes, compression: int, where: str = "lazy-load record") -> bytes:
    """Undo R's ``R_compress1/2/3``: a 4-byte big-endian uncompressed length, then (for types 2 and 3) one type
    byte -- ``'0'`` stored, ``'1'`` zlib, ``'2'`` bzip2, ``'Z'`` xz/LZMA2 -- then the compressed bytes."""
    if len(record) < 4:
        raise RDataError(f"{where}: record shorter than its length header")
    expected = struct.unpack(">I", record[:4])[0]
    body = record[4:]
    try:
        if compression == 0:
            out = body
        elif compression == 1:
            out = zlib.decompress(body)
        else:
            kind, payload = body[:1], body[1:]
            if kind == b"0":
                out = payload
            elif kind == b"1":
                out = zlib.decompress(payload)
            elif kind == b"2":
                out = bz2.decompress(payload)
            elif kind == b"Z":
                out = _decompress_r_xz(payload)
            else:
                raise RDataError(f"{where}: unknown compression type byte {kind!r} (expected 0, 1, 2 or Z)")
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as err:
        raise RDataError(f"{where}: cannot decompress ({err})") from None
    if len(out) != expected:
        raise RDataError(f"{where}: decompressed to {len(out)} bytes, header says {expected}")
    return out


def _decompress_r_xz(payload: bytes) -> bytes:
    # R writes a raw LZMA2 stream (preset 6 filter chain); accept a full .xz container too.
    try:
        return lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    except lzma.LZMAError:
        return lzma.decompress(payload, format=lzma.FORMAT_AUTO)


class _Unserializer:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    # --- primitive readers -------------------------------------------------------------------------------------
    def _take(self, size: int) -> memoryview:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise RDataError(f"R serialization truncated at byte {self.pos} (wanted {size} more bytes)")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            upper, lower = self._int(), self._int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        if n < 0:
            raise RDataError(f"negative vector length {n} at byte {self.pos}")
        return n

    # --- entry point ------------------------------------------------------------------------------------------
    def read(self) -> Any:
        fmt = bytes(self._take(2))
        if fmt != b"X\n":
            kinds = {b"A\n": "ASCII", b"B\n": "native binary"}
            raise RDataError(f"unsupported R serialization format {kinds.get(fmt, repr(fmt))}; only XDR ('X') "
                             "streams are supported (R's default)")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            encoding = bytes(self._take(self._int())).decode("ascii", "replace")
            self.native_encoding = _python_encoding(encoding)
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version} (supported: 2, 3)")
        return self._item()

    # --- items ------------------------------------------------------------------------------------------------
    def _item(self) -> Any:
        flags = self._int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexptype == NILVALUE_SXP:
            return None
        if sexptype in _SPECIAL_VALUES:
            return RSpecial(_SPECIAL_VALUES[sexptype])
        if sexptype == REFSXP:
            index = flags >> 8 or self._int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"reference {index} out of range (table has {len(self.refs)})")
            return self.refs[index - 1]
        if sexptype in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            kind = {PERSISTSXP: "persistent", PACKAGESXP: "package", NAMESPACESXP: "namespace"}[sexptype]
            ref = RReference(kind, tuple(self._string_vector()))
            self.refs.append(ref)
            return ref
        if sexptype == SYMSXP:
            name = self._item()
            symbol = RSymbol(name if isinstance(name, str) else "NA")
            self.refs.append(symbol)
            return symbol
        if sexptype == ENVSXP:
            env = REnvironment(locked=bool(self._int()))
            self.refs.append(env)
            env.enclosure, env.frame, env.hashtab = self._item(), self._item(), self._item()
            env.attributes = _attributes_dict(self._item())
            return env
        if sexptype in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP):
            return self._pairlist(sexptype, has_attr, has_tag)
        if sexptype == ALTREP_SXP:
            return self._altrep()
        if sexptype in (SPECIALSXP, BUILTINSXP):
            name = bytes(self._take(self._int())).decode("ascii", "replace")
            return RSpecial(f"builtin:{name}")
        if sexptype == CHARSXP:
            string = self._charsxp(levels)
            if has_attr:
                self._item()  # legacy CHARSXP attributes: read and ignore, as R does
            return string
        if sexptype in (EXTPTRSXP, WEAKREFSXP):
            placeholder = RSpecial("externalptr" if sexptype == EXTPTRSXP else "weakref")
            self.refs.append(placeholder)
            if sexptype == EXTPTRSXP:
                self._item(), self._item()  # protected value, tag
            if has_attr:
                self._item()
            return placeholder
        if sexptype == BCODESXP:
            raise RDataError("R byte-code (BCODESXP) is not supported; only data objects can be read")

        value = self._vector(sexptype)
        if has_attr:
            value.attributes = _attributes_dict(self._item())
        return value

    def _vector(self, sexptype: int) -> RVector:
        if sexptype == S4SXP:
            return RVector("S4")
        if sexptype not in _TYPE_NAMES:
            raise RDataError(f"unsupported R SEXP type {sexptype} at byte {self.pos - 4}")
        n = self._length()
        rtype = _TYPE_NAMES[sexptype]
        if sexptype in (LGLSXP, INTSXP):
            raw = struct.unpack(f">{n}i", self._take(4 * n))
            if sexptype == LGLSXP:
                return RVector(rtype, [None if v == _NA_INTEGER else bool(v) for v in raw])
            return RVector(rtype, [None if v == _NA_INTEGER else v for v in raw])
        if sexptype == REALSXP:
            return RVector(rtype, struct.unpack(f">{n}d", self._take(8 * n)))
        if sexptype == CPLXSXP:
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return RVector(rtype, [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)])
        if sexptype == RAWSXP:
            return RVector(rtype, bytes(self._take(n)))
        if sexptype == STRSXP:
            return RVector(rtype, [self._string_element() for _ in range(n)])
        return RVector(rtype, [self._item() for _ in range(n)])  # VECSXP, EXPRSXP

    def _string_element(self) -> str | None:
        flags = self._int()
        if flags & 0xFF != CHARSXP:
            raise RDataError(f"character vector element has SEXP type {flags & 0xFF}, expected CHARSXP")
        value = self._charsxp(flags >> 12)
        if flags & (1 << 9):
            self._item()
        return value

    def _charsxp(self, levels: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self._take(n))
        if levels & _UTF8_MASK:
            encoding = "utf-8"
        elif levels & (_LATIN1_MASK | _BYTES_MASK):
            encoding = "latin-1"
        elif levels & _ASCII_MASK:
            encoding = "ascii"
        else:
            encoding = self.native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("utf-8", "replace")

    def _string_vector(self) -> list[str | None]:
        if self._int() != 0:
            raise RDataError("malformed persistent string vector")
        return [self._item() for _ in range(self._length())]

    def _pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> Any:
        # Pairlists are read iteratively along the CDR chain so long lists cannot exhaust Python's recursion limit.
        head_type = sexptype
        attributes: dict[str, Any] = {}
        values: list[Any] = []
        tags: list[str | None] = []
        while True:
            attr = self._item() if has_attr or sexptype in (ATTRLISTSXP, ATTRLANGSXP) else None
            if not values and attr is not None:
                attributes = _attributes_dict(attr)
            tag = self._item() if has_tag else None
            tags.append(tag.name if isinstance(tag, RSymbol) else None)
            values.append(self._item())
            if head_type not in (LISTSXP, ATTRLISTSXP):
                break  # language/closure/promise cells: the CDR is read as an ordinary item below
            flags = struct.unpack(">i", self.data[self.pos : self.pos + 4])[0] if self.pos + 4 <= len(self.data) else 0
            if flags & 0xFF not in (LISTSXP, ATTRLISTSXP):
                break
            self.pos += 4
            sexptype = flags & 0xFF
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        tail = self._item()
        if head_type in (LISTSXP, ATTRLISTSXP):
            if tail is not None:
                values.append(tail)
                tags.append(None)
            kind = "pairlist"
        else:
            kind = _TYPE_NAMES.get(head_type, "language")
            if isinstance(tail, RVector) and tail.rtype == "pairlist":
                tags.extend(tail.names or [None] * len(tail))
                values.extend(tail)
            elif tail is not None:
                values.append(tail)
                tags.append(None)
        if any(tag is not None for tag in tags):
            attributes = {"names": RVector("character", [t or "" for t in tags]), **attributes}
        return RVector(kind, values, attributes)

    def _altrep(self) -> Any:
        info, state, attr = self._item(), self._item(), self._item()
        cls = info[0].name if isinstance(info, RVector) and info and isinstance(info[0], RSymbol) else "?"
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (state[0], state[1], state[2]) if len(state) == 3 else (0, 0, 1)
            seq = [start + i * step for i in range(int(n))]
            value = RVector("integer", [int(v) for v in seq]) if cls == "compact_intseq" else RVector("double", seq)
        elif cls.startswith("wrap_"):
            value = RVector(state[0].rtype, state[0]) if isinstance(state[0], RVector) else state[0]
        elif cls == "deferred_string":
            source = state[0] if isinstance(state, RVector) and state else RVector("integer")
            value = RVector("character", [None if v is None else _r_number_string(v) for v in source])
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r} in R data")
        if isinstance(value, RVector) and attr is not None:
            value.attributes = _attributes_dict(attr)
        return value


def _attributes_dict(pairlist: Any) -> dict[str, Any]:
    if pairlist is None:
        return {}
    if not isinstance(pairlist, RVector):
        raise RDataError("malformed attribute list")
    names = pairlist.names or [None] * len(pairlist)
    return {name or "": value for name, value in zip(names, pairlist, strict=True)}


def _r_number_string(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _python_encoding(r_encoding: str) -> str:
    name = r_encoding.strip().lower()
    if name in ("latin1", "iso-8859-1", "iso8859-1"):
        return "latin-1"
    if name in ("utf-8", "utf8", ""):
        return "utf-8"
    return name  # e.g. "cp1252": Python knows most iconv names; undecodable text falls back to utf-8 with '?'
