"""bpf/maps/packing.py: struct formats derived from the ctypes mirrors, and the layouts it refuses."""

from __future__ import annotations

import ctypes as C
import os

import pytest
from pycilium.bpf.maps import C_STRUCTS, ctmap, events, lbmap, natmap
from pycilium.bpf.maps.packing import LayoutError, field_names, format_of, packer
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16


class Gappy(C.Structure):  # implicit padding after `a` (to 4) and at the end (to 24)
    _fields_ = [("a", C.c_uint8), ("b", C.c_uint32), ("c", C.c_uint64), ("d", C.c_uint16)]


class Signed(C.Structure):
    _fields_ = [("a", C.c_int8), ("b", C.c_int16), ("c", C.c_int32), ("d", C.c_int64), ("e", C.c_bool)]


class Arrays(C.Structure):
    _fields_ = [("ids", C.c_uint32 * 3), ("mac", C.c_uint8 * 6), ("name", C.c_char * 4),
                ("grid", (C.c_uint16 * 2) * 2)]  # fmt: skip


class Inner(C.Structure):
    _fields_ = [("x", C.c_uint32)]


class Nested(C.Structure):
    _fields_ = [("inner", Inner), ("y", C.c_uint32)]


class Bits(C.Structure):
    _fields_ = [("lo", C.c_uint32, 4), ("hi", C.c_uint32, 28)]


class WithPointer(C.Structure):
    _fields_ = [("p", C.c_void_p)]


class WithUnion(C.Structure):
    class U(C.Union):
        _fields_ = [("a", C.c_uint32), ("b", C.c_uint16)]

    _fields_ = [("u", U)]


class NestedArray(C.Structure):
    _fields_ = [("items", Inner * 2)]


class Packed(C.Structure):
    _pack_ = 1
    _fields_ = [("a", C.c_uint8), ("b", C.c_uint32)]


class Big(C.BigEndianStructure):
    _fields_ = [("a", C.c_uint16), ("b", C.c_uint32)]


def test_formats_of_the_lb_maps() -> None:
    assert format_of(lbmap.Lb4Key, {"address": "4s", "dport": "2s"}, skip=("pad",)) == "<4s2sHBB2x"
    assert format_of(lbmap.Lb4Key) == "<IHHBB2B"
    assert format_of(lbmap.Lb4Service) == "<IHHBBH"
    assert format_of(lbmap.Lb4Backend, {"address": "4s", "port": "2s", "node_ip": "4s"}) == "<4s2sBB4s"
    assert format_of(lbmap.LbAffinityVal, only=("backend_id",)) == "<8xI4x"
    assert format_of(lbmap.Lb4MaglevChunk) == f"<{lbmap.LB_MAGLEV_CHUNK}I"


def test_padding_between_and_after_fields() -> None:
    assert format_of(Gappy) == "<B3xIQH6x"
    s = packer(Gappy)
    assert s.size == C.sizeof(Gappy) == 24
    assert s.pack(1, 2, 3, 4) == bytes(Gappy(1, 2, 3, 4))
    assert format_of(Packed) == "<BI" and packer(Packed).size == C.sizeof(Packed) == 5


def test_signed_and_bool() -> None:
    s = packer(Signed)
    assert s.format == "<b1xhiq?7x" and s.size == C.sizeof(Signed) == 24
    assert s.pack(-1, -2, -3, -4, True) == bytes(Signed(-1, -2, -3, -4, True))
    assert s.unpack(bytes(Signed(-5, 6, -7, 8, False))) == (-5, 6, -7, 8, False)


def test_arrays_give_one_value_per_element_and_char_arrays_one_bytes_value() -> None:
    s = packer(Arrays)
    assert s.format == "<3I6B4s4H2x"
    ref = Arrays((C.c_uint32 * 3)(1, 2, 3), (C.c_uint8 * 6)(*range(10, 16)), b"abcd")
    ref.grid[0][1] = 7
    ref.grid[1][0] = 9
    assert s.pack(1, 2, 3, *range(10, 16), b"abcd", 0, 7, 9, 0) == bytes(ref)
    assert field_names(Arrays) == ("ids", "mac", "name", "grid")


def test_every_mirror_packs_like_ctypes() -> None:
    """Default formats of every mirrored struct read the same values ctypes reads from the same bytes."""
    for name, cls in C_STRUCTS.items():
        s = packer(cls)
        assert s.size == C.sizeof(cls), name
        raw = os.urandom(s.size)
        obj = cls.from_buffer_copy(raw)
        flat: list[object] = []
        for f in field_names(cls):
            v = getattr(obj, f)
            flat.extend(_flatten(v))
        assert list(s.unpack(raw)) == flat, name
        assert s.pack(*s.unpack(raw)) == bytes(obj), name


def _flatten(v: object) -> list[object]:
    if isinstance(v, C.Array):
        return [x for e in v for x in _flatten(e)]
    return [v]


def test_overrides_pack_network_order_bytes() -> None:
    s = packer(lbmap.Lb4Backend, {"address": "4s", "port": "2s", "node_ip": "4s"})
    raw = s.pack(bytes([10, 0, 0, 1]), (443).to_bytes(2, "big"), 6, 2, bytes([192, 168, 1, 9]))
    ref = lbmap.Lb4Backend(address=ip_to_be32("10.0.0.1"), port=port_to_be16(443), proto=6, flags=2,
                           node_ip=ip_to_be32("192.168.1.9"))  # fmt: skip
    assert raw == bytes(ref)


def test_skip_and_only_take_no_value() -> None:
    s = packer(lbmap.LbAffinityMatch, skip=("pad",))
    assert s.unpack(bytes(lbmap.LbAffinityMatch(backend_id=5, rev_nat_index=6, pad=0xFFFF))) == (5, 6)
    assert field_names(lbmap.LbAffinityMatch, skip=("pad",)) == ("backend_id", "rev_nat_index")
    v = packer(lbmap.LbAffinityVal, only=("backend_id",))
    assert v.unpack(bytes(lbmap.LbAffinityVal(last_used=99, backend_id=7, pad=1))) == (7,)


def test_network_order_keys() -> None:
    s = packer(ctmap.Ct4Key, {"saddr": "4s", "daddr": "4s"}, skip=("pad",), order=">")
    assert s.format == ">4s4sHHBB2x"
    k = ctmap.Ct4Key(saddr=ip_to_be32("10.0.0.1"), daddr=ip_to_be32("10.0.0.2"), sport=port_to_be16(40000),
                     dport=port_to_be16(80), nexthdr=6, flags=4)  # fmt: skip
    assert s.unpack(bytes(k)) == (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 40000, 80, 6, 4)
    assert format_of(Big, order=">") == ">H2xI"


# The CLI still writes these formats by hand; they must describe the same layout as the derived ones.
def test_cli_decoders_agree_with_the_derived_formats() -> None:
    from pycilium.cli import bpf_ct, bpf_nat, monitor

    pairs = [
        (bpf_ct.KEY, packer(ctmap.Ct4Key, {"saddr": "4s", "daddr": "4s"}, skip=("pad",), order=">")),
        (bpf_ct.VALUE, packer(ctmap.CtEntry)),
        (bpf_nat.VALUE, packer(natmap.Nat4Entry, {"to_addr": "4s", "to_port": "2s"}, skip=("pad",))),
        (monitor.EVENT, packer(events.MonitorEvent, {"saddr": "4s", "daddr": "4s"}, skip=("pad",))),
    ]
    for hand, derived in pairs:
        assert hand.size == derived.size, hand.format
        raw = os.urandom(hand.size)
        assert hand.unpack(raw) == derived.unpack(raw), hand.format


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (Nested, {}, "Nested.inner: Inner has no struct code"),
        (NestedArray, {}, "NestedArray.items: Inner has no struct code"),
        (WithUnion, {}, "WithUnion.u: U has no struct code"),
        (Bits, {}, "Bits.lo: bit field"),
        (WithPointer, {}, "WithPointer.p: ctypes type code 'P'"),
        (lbmap.Lb4Key, {"fields": {"address": "2s"}}, "format '2s' is 2 bytes, the field 4"),
        (lbmap.Lb4Key, {"fields": {"address": "HH"}}, "must give the field one value"),
        (lbmap.Lb4Key, {"fields": {"address": "4x"}}, "must give the field one value"),
        (lbmap.Lb4Key, {"fields": {"address": "4k"}}, "bad format"),
        (lbmap.Lb4Key, {"fields": {"addr": "4s"}}, "has no field addr"),
        (lbmap.Lb4Key, {"skip": ("padding",)}, "has no field padding"),
        (lbmap.Lb4Key, {"fields": {"pad": "2s"}, "skip": ("pad",)}, "both overridden and skipped"),
        (lbmap.Lb4Key, {"order": "="}, "byte order"),
        (Big, {}, "big-endian structure"),
    ],
)
def test_layouts_it_cannot_express_raise(cls: type[C.Structure], kw: dict[str, object], match: str) -> None:
    fields = kw.pop("fields", None)
    with pytest.raises(LayoutError, match=match):
        packer(cls, fields, **kw)  # type: ignore[arg-type]


def test_nested_structure_is_fine_when_overridden_or_skipped() -> None:
    assert format_of(Nested, {"inner": "4s"}) == "<4sI"
    assert format_of(Nested, skip=("inner",)) == "<4xI"


def test_only_structures_are_accepted() -> None:
    with pytest.raises(LayoutError, match="not a ctypes Structure"):
        packer(C.c_uint32)  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="not a ctypes Structure"):
        packer(WithUnion.U)  # type: ignore[arg-type]
