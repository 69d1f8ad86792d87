"""Run a command inside a named network namespace without losing the host's bpffs.

`ip netns exec` remounts /sys for the namespace, which also hides the bpffs mounted at /sys/fs/bpf,
so an agent started that way could not pin its maps where the host (and `pycilium bpf ...`) sees
them. This launcher does what `ip netns exec` does and then puts the host's bpffs back:

1. setns() into /var/run/netns/NAME;
2. unshare a private mount namespace (mounts made here never propagate back);
3. clone the host's /sys/fs/bpf and /sys/fs/cgroup mounts (open_tree), mount the namespace's own sysfs on /sys (so
   /sys/class/net shows the namespace's devices), and move the clones back in place;
4. exec the command (the process keeps its PID, so whoever started it can signal it).

    python -m pycilium.lab.cluster.nsexec [--net-only] NAME -- CMD [ARG ...]

`--net-only` skips steps 2-3: the command keeps the host's mounts. Use it for processes that create
network namespaces (`ip netns add` mounts them under /var/run/netns, and a private mount namespace
would keep those mounts from the rest of the host).

Stdlib only, so it starts fast.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_SYS_OPEN_TREE = 428  # same number on every architecture (the unified syscall table)
_SYS_MOVE_MOUNT = 429

# host mounts under /sys that stay visible: pinned maps, and the cgroup tree programs may attach to
KEEP = ("/sys/fs/bpf", "/sys/fs/cgroup")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags, None),
        f"mount {src} on {target}",
    )


def enter(netns: str, *, net_only: bool = False) -> None:
    """Move this (single-threaded) process into `netns` with its sysfs and the host's bpffs."""
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _check(_libc.setns(fd, _CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)
    if net_only:
        return
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount("none", "/", None, _MS_REC | _MS_SLAVE)
    trees: list[tuple[str, int]] = []
    try:
        for path in KEEP:
            if os.path.ismount(path):
                flags = _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC
                fd = _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), flags)
                _check(0 if fd >= 0 else -1, f"open_tree {path}")
                trees.append((path, fd))
        _check(_libc.umount2(b"/sys", _MNT_DETACH), "umount /sys")
        _mount(netns, "/sys", "sysfs", 0)
        for path, fd in trees:
            rc = _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, path.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
            _check(0 if rc == 0 else -1, f"move_mount onto {path}")
    finally:
        for _, fd in trees:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    net_only = bool(args) and args[0] == "--net-only"
    if net_only:
        args = args[1:]
    if len(args) < 3 or args[1] != "--":
        print(
            "usage: python -m pycilium.lab.cluster.nsexec [--net-only] NETNS -- CMD [ARG ...]",
            file=sys.stderr,
        )
        return 2
    netns, cmd = args[0], args[2:]
    try:
        enter(netns, net_only=net_only)
    except OSError as e:
        print(f"nsexec: {e}", file=sys.stderr)
        return 1
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"nsexec: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
