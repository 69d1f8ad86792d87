"""The C header is the one definition of every map layout; the ctypes mirror must match it exactly.

The test compiles bpf/lib/map_layouts.h with bcc into a program that writes sizeof/offsetof of every
struct and field into an array, runs it with BPF_PROG_TEST_RUN, and compares with the mirror.
"""

from __future__ import annotations

import ctypes
import struct

import pytest
from pycilium.bpf import loader, progtest
from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import ALL_MAPS, C_STRUCTS
from pycilium.bpf.maps.defines import header_defines

pytestmark = pytest.mark.kernel


def _probe_source(slots: list[str]) -> str:
    body = "\n".join(
        f"\tk = {i}; v = (__u64)({expr}); bpf_map_update_elem(MAP(layout_out), &k, &v, 0);"
        for i, expr in enumerate(slots)
    )
    return f"""
#include "common.h"
int probe(struct __sk_buff *skb)
{{
	__u32 k; __u64 v;
{body}
	return 0;
}}
"""


def test_every_struct_matches_the_header(pin_root: str) -> None:
    slots: list[str] = []
    expect: list[tuple[str, int]] = []
    for cname, cls in C_STRUCTS.items():
        slots.append(f"sizeof(struct {cname})")
        expect.append((f"sizeof({cname})", ctypes.sizeof(cls)))
        for fname, *_ in cls._fields_:
            slots.append(f"__builtin_offsetof(struct {cname}, {fname})")
            expect.append((f"{cname}.{fname}", getattr(cls, fname).offset))
    out_fd = sc.map_create(sc.MAP_TYPE_ARRAY, 4, 8, len(slots), "layout_out")
    try:
        prog = loader.compile_program(
            "layout_probe",
            loader.NodeDefines(pin_root, loader.sizes_from_config(None)),
            source=_probe_source(slots),
            extra_cflags=[f"-DMAP_FD_layout_out={out_fd}"],
        )
        try:
            progtest.run_tc(prog.fd("probe"), b"\0" * 64)
        finally:
            prog.close()
        got = []
        for i in range(len(slots)):
            raw = sc.map_lookup(out_fd, struct.pack("<I", i), 8)
            assert raw is not None
            got.append(struct.unpack("<Q", raw)[0])
    finally:
        import os

        os.close(out_fd)
    mismatches = [f"{name}: C={g} python={e}" for (name, e), g in zip(expect, got, strict=True) if g != e]
    assert not mismatches, "layout mismatch:\n" + "\n".join(mismatches)


def test_every_map_spec_uses_mirrored_structs() -> None:
    mirrored = set(C_STRUCTS.values())
    for spec in ALL_MAPS:
        for cls in (spec.key, spec.value):
            assert cls in mirrored or ctypes.sizeof(cls) <= 4, f"{spec.name}: {cls.__name__} is not mirrored"


def test_python_constants_come_from_the_header() -> None:
    d = header_defines()
    assert d["DROP_POLICY"] == 133 and d["CT_DIR_SVC"] == 4 and d["POLICY_FULL_PREFIX"] == 80
