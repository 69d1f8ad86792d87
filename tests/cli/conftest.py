"""Fixtures for the CLI tests: private pinned maps, an in-process and a subprocess CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pycilium.bpf.maps import ALL_MAPS

PYCILIUM = str(Path(sys.executable).parent / "pycilium")

# Small maps: quick to create, enough for every test.
SMALL_SIZES = {spec.size_define: 4096 for spec in ALL_MAPS}
SMALL_SIZES["EVENTS_MAP_SIZE"] = 0  # one slot per possible CPU
SMALL_SIZES["LB_MAGLEV_MAP_SIZE"] = 64


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*args: str) -> Result:
    """Run `pycilium ARGS` in-process (stdout/stderr captured, SystemExit turned into the code)."""
    from pycilium.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def cli_subprocess(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Result:
    """Run the installed `pycilium` console script."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([PYCILIUM, *args], capture_output=True, text=True, timeout=timeout, env=full_env)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def maps(pin_root: str) -> str:
    """Every datapath map, empty and pinned under a private pin root; returns the root."""
    from pycilium.bpf import loader

    fds = loader.open_pinned_maps(pin_root, SMALL_SIZES)
    for fd in fds.values():
        os.close(fd)
    return pin_root
