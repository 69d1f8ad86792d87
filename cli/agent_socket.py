"""The agent's socket path from -H, and a cheap reachability check (no grpc import)."""

from __future__ import annotations

import os


def socket_from_host(host: str) -> str:
    """-H accepts a path or a unix:// URL (Cilium style)."""
    if host.startswith("unix://"):
        return host[len("unix://") :]
    if host.startswith("unix:"):
        return host[len("unix:") :]
    return host


def unreachable_message(socket_path: str, detail: str = "") -> str:
    hint = "is it running?"
    if "ermission denied" in detail:
        hint = "permission denied (the socket is root-only)"
    return f"cannot reach the agent at {socket_path}: {hint}"


def socket_problem(socket_path: str) -> str | None:
    """Why the socket cannot be used, before trying gRPC (None: it exists and we may stat it)."""
    try:
        os.stat(socket_path)
    except PermissionError:
        return unreachable_message(socket_path, "Permission denied")
    except OSError:
        return unreachable_message(socket_path)
    return None
