"""Installing the CNI configuration and the plugin executable on the node.

`install_cni_binary` writes ``<cni_bin_dir>/pycilium-cni``: a POSIX-sh preamble followed by a zip of
the stdlib-only plugin package (with bytecode for the installing interpreter). The preamble tries
absolute interpreter paths (the agent's own interpreter first), so it works with the empty PATH
containerd gives plugins, and runs ``python -IS -c <boot> <itself>``: isolated mode (no PYTHON*
variables, no user site, the working directory is not on sys.path), no site (no .pth processing). Python runs a file that ends in a zip archive as an application, so the one file
is self-contained: it does not depend on the agent's virtualenv or source tree, and it starts in
~20 ms. The file is replaced atomically (rename), so a plugin running at that moment is unaffected.

`install_cni_config` writes ``<cni_conf_dir>/<cni_conf_name>`` atomically; in exclusive mode every
other configuration in the directory is renamed to ``*.pycilium_bak`` so the runtime cannot fall
back to another network. `remove_cni_config` removes ours (and can restore the backups). The agent
keeps its configuration across restarts: removing it would make pod DELs fail during an upgrade.
"""

from __future__ import annotations

import io
import json
import logging
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from pycilium.cni import protocol as p

log = logging.getLogger("pycilium.cniapi.install")

NETWORK_NAME = "pycilium"
CNI_VERSIONS = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]
BINARY_NAME = p.PLUGIN_TYPE
BACKUP_SUFFIX = ".pycilium_bak"
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
# -c rather than running the zip as a script: that goes through runpy (~5 ms of imports)
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from pycilium.cni.main import main; sys.exit(main())"
FALLBACK_INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.11")


def conflist(config: Any) -> dict[str, Any]:
    """The network configuration list the agent installs."""
    from pycilium.agent.cniapi.server import delete_queue_dir

    return {
        "cniVersion": "1.1.0",
        "cniVersions": list(CNI_VERSIONS),
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": BINARY_NAME,
                "mtu": config.pod_mtu,  # minus the tunnel overhead in tunnel mode
                "log-file": config.cni_log_file,
                "agent-socket": config.cni_socket_path,
                "delete-queue-dir": delete_queue_dir(config),
            }
        ],
    }


def install_cni_config(config: Any) -> Path:
    """Write the conflist atomically (unchanged content is not rewritten); returns its path."""
    conf_dir = Path(config.cni_conf_dir)
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / config.cni_conf_name
    data = (json.dumps(conflist(config), indent=2) + "\n").encode()
    try:
        same = path.read_bytes() == data
    except OSError:
        same = False
    if not same:
        p.atomic_write(path, data, 0o644)
        log.info("CNI configuration written", extra={"path": str(path)})
    if config.cni_exclusive:
        for other in sorted(conf_dir.iterdir()):
            if other.name == path.name or other.name.startswith(".") or not other.is_file():
                continue
            if other.suffix in CONFIG_SUFFIXES:
                other.rename(other.with_name(other.name + BACKUP_SUFFIX))
                log.warning(
                    "exclusive CNI mode: disabled a foreign configuration", extra={"path": str(other)}
                )
    return path


def remove_cni_config(config: Any, *, restore_backups: bool = False) -> bool:
    """Remove our conflist; with `restore_backups`, rename ``*.pycilium_bak`` files back."""
    conf_dir = Path(config.cni_conf_dir)
    path = conf_dir / config.cni_conf_name
    try:
        path.unlink()
        removed = True
    except FileNotFoundError:
        removed = False
    if restore_backups and conf_dir.is_dir():
        for bak in conf_dir.glob("*" + BACKUP_SUFFIX):
            orig = bak.with_name(bak.name[: -len(BACKUP_SUFFIX)])
            if not orig.exists():
                bak.rename(orig)
    return removed


def _interpreters(preferred: str | None) -> list[str]:
    out: list[str] = []
    for cand in (preferred, os.path.realpath(sys.executable), sys.executable, *FALLBACK_INTERPRETERS):
        if cand and cand not in out and "'" not in cand:
            out.append(cand)
    return out


def build_launcher(interpreter: str | None = None) -> bytes:
    """sh preamble + zip(__main__.py, pycilium/cni/*.py and their bytecode)."""
    tries = " ".join(f"'{i}'" for i in _interpreters(interpreter))
    err = json.dumps({"cniVersion": p.LATEST_VERSION, "code": p.ERR_IO,
                      "msg": "pycilium-cni: no python3 interpreter found on this host"})  # fmt: skip
    preamble = (
        "#!/bin/sh\n"
        "# pycilium-cni: generated by the pycilium agent. A sh preamble + a zip of the stdlib-only\n"
        "# plugin; runs with an empty environment (containerd passes only CNI_* variables).\n"
        f"for py in {tries}; do\n"
        f'  [ -x "$py" ] && exec "$py" -IS -c \'{_BOOT}\' "$0"\n'
        "done\n"
        f"echo '{err}'\n"
        "exit 1\n"
    ).encode()
    pkg_dir = Path(p.__file__).resolve().parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf, tempfile.TemporaryDirectory() as tmp:
        zf.writestr("__main__.py", "import sys\nfrom pycilium.cni.main import main\n\nsys.exit(main())\n")
        zf.writestr("pycilium/__init__.py", "")
        for src in sorted(pkg_dir.glob("*.py")):
            arc = f"pycilium/cni/{src.name}"
            zf.write(src, arc)
            # unchecked-hash bytecode: used when the running interpreter's magic matches, else the
            # source next to it is compiled (a different host python still works, just slower)
            pyc = os.path.join(tmp, src.name + "c")
            py_compile.compile(str(src), cfile=pyc, dfile=arc, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)  # fmt: skip
            zf.write(pyc, arc + "c")
    return preamble + buf.getvalue()


SHIM_SOURCE = Path(p.__file__).resolve().parent / "shim" / "pycilium-cni.c"
PYTHON_PLUGIN_NAME = f"{BINARY_NAME}-py"


def build_native_launcher(fallback: str, cc: str | None = None) -> bytes | None:
    """Compile cni-plugin/shim/pycilium-cni.c (static) with `fallback` as the Python plugin it execs
    when the agent cannot take the invocation; None when no C compiler works here."""
    compiler = cc or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SHIM_SOURCE.exists() or '"' in fallback:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, BINARY_NAME)
        for static in (["-static"], []):
            r = subprocess.run([compiler, "-O2", *static, f'-DFALLBACK="{fallback}"', "-o", out, str(SHIM_SOURCE)],
                               capture_output=True, text=True)  # fmt: skip
            if r.returncode == 0:
                return Path(out).read_bytes()
        log.warning("cannot compile the native CNI launcher; installing the Python plugin only",
                    extra={"error": r.stderr.strip()[-500:]})  # fmt: skip
    return None


def _install_file(path: Path, data: bytes) -> None:
    try:
        same = path.read_bytes() == data
    except OSError:
        same = False
    if not same:
        p.atomic_write(path, data, 0o755)
        log.info("CNI plugin installed", extra={"path": str(path)})


def install_cni_binary(config: Any, *, interpreter: str | None = None, native: bool = True) -> Path:
    """Install ``<cni_bin_dir>/pycilium-cni`` atomically; returns its path.

    The Python plugin (stdlib only) always goes to ``pycilium-cni-py``. Where a C compiler is
    available, ``pycilium-cni`` is the native launcher (starts in ~1 ms; the agent runs the
    plugin logic and the launcher falls back to ``pycilium-cni-py`` when the agent cannot), else
    ``pycilium-cni`` is the Python plugin itself.
    """
    bin_dir = Path(config.cni_bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / BINARY_NAME
    py_plugin = build_launcher(interpreter)
    py_path = bin_dir / PYTHON_PLUGIN_NAME
    _install_file(py_path, py_plugin)
    native_bin = build_native_launcher(str(py_path)) if native else None
    _install_file(path, native_bin if native_bin is not None else py_plugin)
    return path
