"""Compile datapath programs with bcc, keep their maps pinned, attach them to TC and XDP.

Programs are compiled once per agent start per program type, with node-level -D settings; per-pod
data lives in maps, so attaching a program to a new veth is a netlink call, not a compile.

Maps are pinned under the node's bpf root (one directory per node). On start the loader checks
every pinned map against the layout this version expects: a map whose key/value layout changed is
removed and recreated (its state cannot be read), a map whose size changed is recreated with the
new size and its entries copied over, so conntrack and NAT survive a resize.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycilium.bpf import rtnl
from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import ALL_MAPS, MapSpec

log = logging.getLogger("pycilium.datapath.loader")

BPF_DIR = Path(__file__).resolve().parent
LIB_DIR = BPF_DIR / "lib"

# bcc program types (mirrors bcc.BPF constants; bcc is imported lazily: it costs ~0.2 s)
SCHED_CLS = 3
XDP = 6
CGROUP_SOCK_ADDR = 18

TC_INGRESS = "ingress"
TC_EGRESS = "egress"


class DatapathError(RuntimeError):
    """A datapath program failed to compile, load or attach."""


class CompileError(DatapathError):
    def __init__(self, program: str, log_text: str):
        self.program, self.log = program, log_text
        super().__init__(f"BPF program {program!r} failed to compile:\n{log_text.strip()}")


class VerifierError(DatapathError):
    def __init__(self, program: str, function: str, reason: str, log_text: str):
        self.program, self.function, self.log = program, function, log_text
        tail = "\n".join(log_text.strip().splitlines()[-40:])
        super().__init__(
            f"BPF program {program!r} function {function!r} rejected by the kernel ({reason}); "
            f"verifier log (last lines):\n{tail}"
        )


@contextlib.contextmanager
def _capture_stderr() -> Iterator[list[str]]:
    """Collect what bcc/LLVM and libbpf print on fd 2 (compiler diagnostics, verifier logs)."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


@dataclass(frozen=True)
class NodeDefines:
    """Node-level settings compiled into every program as -D flags."""

    pin_root: str
    sizes: Mapping[str, int] = field(default_factory=dict)  # MapSpec.size_define -> max_entries
    values: Mapping[str, int | str] = field(default_factory=dict)  # other -D NAME=VALUE

    def cflags(self) -> list[str]:
        flags = [
            f"-I{LIB_DIR}",
            f'-DPIN_ROOT="{self.pin_root}"',
            "-Wno-unused-function",
            "-Wno-constant-logical-operand",
            "-Wno-incompatible-pointer-types-discards-qualifiers",
        ]
        for k, v in sorted(self.values.items()):
            flags.append(f"-D{k}" if v == "" else f"-D{k}={v}")
        return flags


def sizes_from_config(config: object | None) -> dict[str, int]:
    """Map size -D values from the agent config (or the defaults)."""
    sizes: dict[str, int] = {}
    for spec in ALL_MAPS:
        sizes[spec.size_define] = spec.size_for(config)
    return sizes


# ---- pinned maps ---------------------------------------------------------------------------------


def _copy_entries(src_fd: int, dst_fd: int, spec: MapSpec[Any, Any]) -> int:
    info = sc.map_info(src_fd)
    dst_max = sc.map_info(dst_fd).max_entries
    entries = list(sc.map_items(src_fd, info))[:dst_max]
    if info.type in (sc.MAP_TYPE_LPM_TRIE, sc.MAP_TYPE_PERF_EVENT_ARRAY) or spec.percpu:
        for k, v in entries:
            with contextlib.suppress(sc.BPFError):
                sc.map_update(dst_fd, k, v)
    else:
        for i in range(0, len(entries), 8192):
            chunk = entries[i : i + 8192]
            sc.map_update_batch(dst_fd, [k for k, _ in chunk], [v for _, v in chunk])
    return len(entries)


def open_pinned_map(pin_root: str, spec: MapSpec[Any, Any], max_entries: int) -> int:
    """Open the pinned map, creating, recreating or resizing it as needed; returns an fd.

    A map whose type or key/value layout differs from `spec` cannot be read any more: it is
    replaced by an empty one. A map whose size differs is replaced by one of the new size with
    its entries copied (conntrack and NAT survive a resize). The new map is pinned once it is
    complete.
    """
    path = Path(pin_root) / spec.name
    ks, vs = ctypes.sizeof(spec.key), ctypes.sizeof(spec.value)
    if path.exists():
        fd = sc.obj_get(str(path))
        info = sc.map_info(fd)
        if info.type == spec.map_type and info.key_size == ks and info.value_size == vs:
            if info.max_entries == max_entries:
                return fd
            new_fd = spec.create(max_entries)
            copied = _copy_entries(fd, new_fd, spec)
            log.info("map size changed; recreated with entries copied",
                     extra={"map": spec.name, "old": info.max_entries, "new": max_entries, "entries": copied})  # fmt: skip
        else:
            new_fd = spec.create(max_entries)
            log.warning("map layout changed; recreated empty",
                        extra={"map": spec.name, "old": (info.type, info.key_size, info.value_size),
                               "new": (spec.map_type, ks, vs)})  # fmt: skip
        os.close(fd)
        # bpffs cannot rename over a pin: unpin the old map, pin the complete new one.
        path.unlink()
        sc.obj_pin(new_fd, str(path))
        return new_fd
    fd = spec.create(max_entries)
    sc.obj_pin(fd, str(path))
    return fd


def open_pinned_maps(pin_root: str, sizes: Mapping[str, int]) -> dict[str, int]:
    """Open every datapath map of a node (see open_pinned_map); name -> fd."""
    Path(pin_root).mkdir(parents=True, exist_ok=True)
    fds: dict[str, int] = {}
    try:
        for spec in ALL_MAPS:
            n = sizes.get(spec.size_define, spec.default_size) or sc.possible_cpus()
            fds[spec.name] = open_pinned_map(pin_root, spec, n)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def remove_pin_root(pin_root: str) -> None:
    """Remove every pinned map of a node (used by `lab down` and clean-state), after detaching the
    node's socket load-balancing programs, which would otherwise keep serving from these maps."""
    root = Path(pin_root)
    if not root.exists():
        return
    from pycilium.bpf.cgroup import detach_node_sock_programs

    with contextlib.suppress(OSError):
        detach_node_sock_programs(pin_root)
    for p in root.iterdir():
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            p.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()


# ---- programs ------------------------------------------------------------------------------------


class LoadedProgram:
    """One compiled bcc module: a program source with its functions loaded on demand."""

    def __init__(self, name: str, bpf: Any, map_fds: dict[str, int]):
        self.name = name
        self._bpf = bpf
        self.map_fds = map_fds
        self._fds: dict[tuple[str, int, int], int] = {}

    def fd(self, function: str, prog_type: int = SCHED_CLS, attach_type: int = -1) -> int:
        key = (function, prog_type, attach_type)
        if key in self._fds:
            return self._fds[key]
        with _capture_stderr() as err:
            try:
                fn = self._bpf.load_func(function.encode(), prog_type, None, attach_type)
            except Exception as e:
                failed: Exception | None = e
            else:
                failed = None
        if failed is not None:
            raise VerifierError(self.name, function, str(failed), "".join(err)) from None
        self._fds[key] = int(fn.fd)
        return self._fds[key]

    def close(self) -> None:
        """Release our fds; attached programs and pinned maps stay alive in the kernel."""
        with contextlib.suppress(Exception):
            self._bpf.cleanup()
        for fd in self.map_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.map_fds = {}


def compile_program(
    name: str, defines: NodeDefines, source: str | None = None, extra_cflags: list[str] | None = None
) -> LoadedProgram:
    """Compile bpf/<name>.c (or `source`) with the node's defines; maps get pinned under pin_root."""
    from bcc import BPF

    fds = open_pinned_maps(defines.pin_root, defines.sizes)
    cflags = [*defines.cflags(), *(f"-DMAP_FD_{n}={fd}" for n, fd in fds.items()), *(extra_cflags or [])]
    kwargs: dict[str, Any] = {"cflags": cflags}
    if source is None:
        src_file = BPF_DIR / f"{name}.c"
        if not src_file.exists():
            raise DatapathError(f"no such datapath program {name!r} ({src_file})")
        kwargs["src_file"] = str(src_file).encode()
    else:
        kwargs["text"] = source.encode()
    with _capture_stderr() as err:
        try:
            bpf = BPF(**kwargs)
        except Exception:
            bpf = None
    if bpf is None:
        for fd in fds.values():
            os.close(fd)
        raise CompileError(name, "".join(err))
    log.debug("compiled datapath program", extra={"program": name, "pin_root": defines.pin_root})
    return LoadedProgram(name, bpf, fds)


# ---- attach --------------------------------------------------------------------------------------


def _ifindex(ipr: Any, dev: str | int) -> int:
    if isinstance(dev, int):
        return dev
    links = ipr.link_lookup(ifname=dev)
    if not links:
        raise DatapathError(f"no such network device {dev!r}")
    return int(links[0])


# tc requests over pycilium.bpf.rtnl (no pyroute2 event loop: this runs on every pod ADD/DEL).
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 36, 37, 44, 45, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT, CLSACT_HANDLE = 0xFFFFFFF1, 0xFFFF0000
_TC_PARENT = {TC_INGRESS: 0xFFFFFFF2, TC_EGRESS: 0xFFFFFFF3}
_FILTER_PRIO, _FILTER_HANDLE, _ETH_P_ALL = 1, 1, 0x0003
_TCMSG = struct.Struct("=BxxxiIII")  # tcmsg: family, ifindex, handle, parent, info
_ENOENT, _EEXIST, _EINVAL = 2, 17, 22


def _tcmsg(index: int, handle: int, parent: int, info: int = 0) -> bytes:
    return _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, info)


def _clsact_request(index: int, *, delete: bool = False) -> rtnl.Request:
    body = _tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT) + rtnl.attr_str(TCA_KIND, "clsact")
    if delete:
        return rtnl.Request(RTM_DELQDISC, 0, body)
    return rtnl.Request(RTM_NEWQDISC, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL, body)


def _filter_request(index: int, direction: str, prog_fd: int | None = None, name: str = "") -> rtnl.Request:
    """``tc filter replace dev <index> <direction> prio 1 handle 1 protocol all bpf da fd <prog_fd>``
    (without a program: the delete of that filter)."""
    info = _FILTER_PRIO << 16 | socket.htons(_ETH_P_ALL)
    body = _tcmsg(index, _FILTER_HANDLE, _TC_PARENT[direction], info) + rtnl.attr_str(TCA_KIND, "bpf")
    if prog_fd is None:
        return rtnl.Request(RTM_DELTFILTER, 0, body)
    options = rtnl.attr_u32(TCA_BPF_CLASSID, 1) + rtnl.attr_u32(TCA_BPF_FD, prog_fd)
    options += rtnl.attr_str(TCA_BPF_NAME, name) + rtnl.attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
    return rtnl.Request(
        RTM_NEWTFILTER, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE, body + rtnl.attr(TCA_OPTIONS, options)
    )


def _dev_index(dev: str | int) -> int | None:
    if isinstance(dev, int):
        return dev
    try:
        return socket.if_nametoindex(dev)  # in the calling thread's network namespace
    except OSError:
        return None


def attach_tc(dev: str | int, prog_fd: int, direction: str, name: str = "pycilium") -> None:
    """Attach a direct-action classifier to clsact ingress/egress of `dev`, replacing ours if present.

    `replace` keeps the hook populated at every instant, so reloading never lets a packet through
    unprocessed. The qdisc (already there: fine) and the filter go out in one request batch.
    """
    if direction not in _TC_PARENT:
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    idx = _dev_index(dev)
    if idx is None:
        raise DatapathError(f"no such network device {dev!r}")
    with rtnl.Rtnl() as rt:
        qdisc, filt = rt.batch([_clsact_request(idx), _filter_request(idx, direction, prog_fd, name)])
    if qdisc.error and qdisc.error != _EEXIST:
        raise DatapathError(f"cannot add clsact qdisc on {dev}: {rtnl.netlink_error(qdisc.error)}")
    if filt.error:
        raise DatapathError(f"cannot attach {name} to {dev} {direction}: {rtnl.netlink_error(filt.error)}")


def detach_tc(dev: str | int, direction: str | None = None) -> None:
    """Remove our filters (or the whole clsact qdisc when direction is None). Missing is fine."""
    idx = _dev_index(dev)
    if idx is None:
        return
    req = _clsact_request(idx, delete=True) if direction is None else _filter_request(idx, direction)
    with rtnl.Rtnl() as rt:
        reply = rt.call(req)
    if reply.error and reply.error not in (_ENOENT, _EINVAL):  # nothing attached
        raise rtnl.netlink_error(reply.error)


def tc_attached(dev: str | int, direction: str) -> bool:
    """Whether a bpf classifier is attached to `dev` in `direction`."""
    idx = _dev_index(dev)
    if idx is None:
        return False
    with rtnl.Rtnl() as rt:
        try:
            filters = rt.dump(RTM_GETTFILTER, _tcmsg(idx, 0, _TC_PARENT[direction]))
        except Exception:  # a netlink error (pyroute2's NetlinkError): e.g. the device went away
            return False
    for _kind, body in filters:
        kind = rtnl.parse_attrs(body, _TCMSG.size).get(TCA_KIND)
        if kind is not None and rtnl.str_attr(kind) == "bpf":
            return True
    return False


def attach_xdp(dev: str | int, prog_fd: int, flags: int = 0) -> None:
    """Attach an XDP program (driver mode if available, else generic: flags 0)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        idx = _ifindex(ipr, dev)
        try:
            ipr.link("set", index=idx, xdp_fd=prog_fd)
        except NetlinkError as e:
            raise DatapathError(f"cannot attach XDP program to {dev}: {e}") from e


def detach_xdp(dev: str | int) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            idx = _ifindex(ipr, dev)
            ipr.link("set", index=idx, xdp_fd=-1)
        except (DatapathError, NetlinkError):
            return
