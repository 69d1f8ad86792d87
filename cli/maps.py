"""Opening pinned maps for commands, with the CLI's error messages."""

from __future__ import annotations

import errno
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import BY_NAME, MapNotPinnedError, PinnedMap
from pycilium.cli.errors import CliError, Unavailable


def open_map(name: str, bpf_root: str) -> PinnedMap[Any, Any]:
    """Open the pinned map `name` under bpf_root; Unavailable (exit 2) when it is not pinned."""
    spec = BY_NAME[name]
    try:
        return PinnedMap(spec, bpf_root)
    except MapNotPinnedError as e:
        raise Unavailable(str(e)) from None
    except sc.BPFError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise CliError(f"permission denied opening map {name} under {bpf_root}: run as root") from None
        raise CliError(f"cannot open map {name} under {bpf_root}: {e.strerror or e}") from None
    except ValueError as e:  # layout mismatch
        raise CliError(str(e)) from None


def bpf_error(e: sc.BPFError, what: str) -> CliError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return CliError(f"permission denied {what}: run as root")
    return CliError(f"{what} failed: {e.strerror or e}")
