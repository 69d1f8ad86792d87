"""`struct` formats derived from the ctypes mirrors, for code that packs map entries as bytes.

Hot paths (a full service sync writes tens of thousands of entries) build keys and values with a
precompiled `struct.Struct` instead of ctypes objects. The format is never written by hand: it is
derived here from the mirror's fields and offsets, so the C header (bpf/lib/map_layouts.h) stays the
one definition of every layout, with the ctypes mirror checked against it and the format checked
against the mirror.

    KEY = packer(Lb4Key, {"address": "4s", "dport": "2s"}, skip=("pad",))   # "<4s2sHBB2x"

- Fields are packed in host order ("<" on the little-endian machines the datapath runs on) with the
  code of their ctypes type (c_uint16 -> "H", c_uint32 * 4 -> "4I", ...). Gaps between fields and
  after the last one (alignment) become "x" pad bytes.
- `fields` overrides the code of a field, e.g. "4s" for a network-order address or "2s" for a port
  kept as raw bytes; the override must have the field's size.
- `skip` packs a field as pad bytes (it takes no value); `only` skips every field not named.
- `order=">"` decodes every multi-byte field as network order (for keys holding only such fields).

Anything the format cannot express faithfully raises LayoutError at import time: bit fields, nested
structures or unions, pointers, arrays of those, an override of the wrong size, a field that
overlaps the previous one.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["LayoutError", "field_names", "format_of", "packer"]


class LayoutError(TypeError):
    """The ctypes layout cannot be expressed as the requested struct format."""


_INT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}
_OTHER_CODES = {"?": "?", "c": "c", "f": "f", "d": "d"}


def _scalar_code(cls: type[Any], t: Any, where: str) -> str:
    """The struct code of one simple ctypes type (no count)."""
    tc = getattr(t, "_type_", None)
    if not isinstance(tc, str) or not issubclass(t, ctypes._SimpleCData):
        raise LayoutError(f"{cls.__name__}.{where}: {getattr(t, '__name__', t)} has no struct code "
                          "(nested structure, union or pointer): give an override or skip it")  # fmt: skip
    if tc in "bBhHiIlLqQ":
        code = _INT_CODES.get(ctypes.sizeof(t))
        if code is None:
            raise LayoutError(f"{cls.__name__}.{where}: integer of size {ctypes.sizeof(t)}")
        return code if tc.islower() else code.upper()
    code = _OTHER_CODES.get(tc)
    if code is None:
        raise LayoutError(f"{cls.__name__}.{where}: ctypes type code {tc!r} has no struct code")
    return code


def _field_code(cls: type[Any], name: str, t: Any) -> str:
    """The struct code of a field's ctypes type: "H", "I", "4I" for arrays (nested arrays flattened)."""
    count = 1
    while isinstance(t, type) and issubclass(t, ctypes.Array):
        count *= int(getattr(t, "_length_"))  # noqa: B009 (typeshed types it as a method)
        t = getattr(t, "_type_")  # noqa: B009
    code = _scalar_code(cls, t, name)
    if count == 1:
        return code
    if code == "c":  # char[N]: one bytes value, as ctypes itself reads it
        return f"{count}s"
    return f"{count}{code}"


def _derive(
    cls: type[ctypes.Structure],
    fields: Mapping[str, str],
    skip: Collection[str],
    only: Collection[str] | None,
    order: str,
) -> tuple[str, tuple[str, ...]]:
    if not (isinstance(cls, type) and issubclass(cls, ctypes.Structure)):
        raise LayoutError(f"{cls!r} is not a ctypes Structure")
    if order not in ("<", ">"):
        raise LayoutError(f"byte order {order!r}: use '<' (host, little-endian) or '>' (network)")
    declared = [f[0] for f in cls._fields_]
    unknown = (set(fields) | set(skip) | set(only or ())) - set(declared)
    if unknown:
        raise LayoutError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    if issubclass(cls, ctypes.BigEndianStructure) and order != ">":
        raise LayoutError(f"{cls.__name__} is a big-endian structure: use order='>'")
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    for entry in cls._fields_:
        name, t = entry[0], entry[1]
        if len(entry) > 2:
            raise LayoutError(f"{cls.__name__}.{name}: bit field ({entry[2]} bits) has no struct code")
        desc = getattr(cls, name)
        offset, size = desc.offset, desc.size
        if offset < pos:
            raise LayoutError(f"{cls.__name__}.{name}: at offset {offset}, overlapping the previous field")
        if offset > pos:
            parts.append(f"{offset - pos}x")
        at = struct.calcsize(order + "".join(parts))
        if at != offset:
            raise LayoutError(f"{cls.__name__}.{name}: derived offset {at}, ctypes offset {offset}")
        if name in skip or (only is not None and name not in only):
            if name in fields:
                raise LayoutError(f"{cls.__name__}.{name}: both overridden and skipped")
            code = f"{size}x" if size else ""
        else:
            code = fields[name] if name in fields else _field_code(cls, name, t)
            try:
                one = struct.Struct(order + code)
            except struct.error as e:
                raise LayoutError(f"{cls.__name__}.{name}: bad format {code!r}: {e}") from None
            if one.size != size:
                raise LayoutError(
                    f"{cls.__name__}.{name}: format {code!r} is {one.size} bytes, the field {size}"
                )
            if "x" in code or (len(one.unpack(bytes(size))) != 1 and not _is_array(t)):
                raise LayoutError(f"{cls.__name__}.{name}: format {code!r} must give the field one value")
            names.append(name)
        parts.append(code)
        pos = offset + size
    total = ctypes.sizeof(cls)
    if total > pos:
        parts.append(f"{total - pos}x")
    fmt = order + "".join(parts)
    if struct.calcsize(fmt) != total:
        raise LayoutError(f"{cls.__name__}: derived size {struct.calcsize(fmt)}, ctypes size {total}")
    return fmt, tuple(names)


def _is_array(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, ctypes.Array)


def format_of(
    cls: type[ctypes.Structure],
    fields: Mapping[str, str] | None = None,
    *,
    skip: Collection[str] = (),
    only: Collection[str] | None = None,
    order: str = "<",
) -> str:
    """The struct format of `cls`: see the module docstring. Raises LayoutError."""
    return _derive(cls, fields or {}, skip, only, order)[0]


def field_names(
    cls: type[ctypes.Structure],
    fields: Mapping[str, str] | None = None,
    *,
    skip: Collection[str] = (),
    only: Collection[str] | None = None,
    order: str = "<",
) -> tuple[str, ...]:
    """The fields whose values the format packs, in order (skipped fields take none)."""
    return _derive(cls, fields or {}, skip, only, order)[1]


def packer(
    cls: type[ctypes.Structure],
    fields: Mapping[str, str] | None = None,
    *,
    skip: Collection[str] = (),
    only: Collection[str] | None = None,
    order: str = "<",
) -> struct.Struct:
    """A precompiled struct for `cls` (pack/unpack take the non-skipped fields in declaration
    order). Raises LayoutError when the format would not have the ctypes layout."""
    return struct.Struct(format_of(cls, fields, skip=skip, only=only, order=order))
