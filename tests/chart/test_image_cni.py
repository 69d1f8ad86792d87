"""The image's CNI bundle as the install-cni-binaries init container installs it on a host.

The Dockerfile builds `pycilium-cni` (the static native launcher from cni-plugin/shim) next to
`pycilium-cni-py` (the Python plugin) and deploy/image/install-cni.sh copies that bundle into the
host's CNI bin dir behind a symlink. This builds the same bundle here (the Python plugin as the
agent's stdlib launcher instead of the PyInstaller build, which needs the image) and checks that a
runtime exec'ing <bin>/pycilium-cni gets answers through the launcher's fallback, which must find
`pycilium-cni-py` through the symlink.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pycilium.agent.cniapi.install import SHIM_SOURCE, build_launcher

from .helm import REPO_ROOT

INSTALL_SCRIPT = REPO_ROOT / "deploy" / "image" / "install-cni.sh"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler: scripts/setup.sh installs one with the kernel headers"
    src = tmp_path / "image" / "pycilium-cni"
    src.mkdir(parents=True)
    # built exactly as the Dockerfile does: no FALLBACK compiled in, the plugin is found next to it
    subprocess.run([cc, "-O2", "-o", str(src / "pycilium-cni"), str(SHIM_SOURCE)], check=True)
    py = src / "pycilium-cni-py"
    py.write_bytes(build_launcher())
    py.chmod(0o755)
    (src / "BUILD_ID").write_text("0123456789abcdef\n")
    return src


def _install(bundle: Path, bin_dir: Path) -> str:
    env = dict(os.environ, PYCILIUM_CNI_BUNDLE=str(bundle))
    r = subprocess.run(["sh", str(INSTALL_SCRIPT), str(bin_dir)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _cni(binary: Path, command: str, stdin: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, **extra}
    return subprocess.run([str(binary)], input=stdin, env=env, capture_output=True, text=True, timeout=30)


def test_installed_launcher_falls_back_to_the_python_plugin_beside_it(bundle: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "host" / "opt" / "cni" / "bin"
    assert "installed pycilium-cni (0123456789abcdef)" in _install(bundle, bin_dir)
    link = bin_dir / "pycilium-cni"
    assert link.is_symlink() and os.readlink(link) == ".pycilium-cni-0123456789abcdef/pycilium-cni"
    assert (bin_dir / ".pycilium-cni-0123456789abcdef" / "pycilium-cni-py").is_file()

    # VERSION is always answered by the Python plugin: the launcher has to find it via the symlink
    r = _cni(link, "VERSION", '{"cniVersion": "1.1.0"}')
    assert r.returncode == 0, r.stdout + r.stderr
    versions = json.loads(r.stdout)
    assert versions["cniVersion"] == "1.1.0" and "0.4.0" in versions["supportedVersions"]

    # no agent behind the configured socket: ADD goes to the fallback, which says "try again later"
    conf = {"cniVersion": "1.1.0", "name": "pycilium", "type": "pycilium-cni",
            "agent-socket": str(tmp_path / "absent.sock")}  # fmt: skip
    netns = tmp_path / "netns"
    netns.touch()
    r = _cni(link, "ADD", json.dumps(conf), CNI_CONTAINERID="c0ffee", CNI_NETNS=str(netns), CNI_IFNAME="eth0",
             CNI_PATH=str(bin_dir))  # fmt: skip
    assert r.returncode != 0
    assert json.loads(r.stdout)["code"] == 11, r.stdout  # CNI: try again later


def test_reinstall_is_idempotent_and_replaces_older_builds(bundle: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _install(bundle, bin_dir)
    first = (bin_dir / ".pycilium-cni-0123456789abcdef" / "pycilium-cni").stat().st_ino
    _install(bundle, bin_dir)
    assert (bin_dir / ".pycilium-cni-0123456789abcdef" / "pycilium-cni").stat().st_ino == first
    (bundle / "BUILD_ID").write_text("fedcba9876543210\n")
    _install(bundle, bin_dir)
    assert os.readlink(bin_dir / "pycilium-cni") == ".pycilium-cni-fedcba9876543210/pycilium-cni"
    assert sorted(p.name for p in bin_dir.iterdir()) == [".pycilium-cni-fedcba9876543210", "pycilium-cni"]
    assert _cni(bin_dir / "pycilium-cni", "VERSION", '{"cniVersion": "1.0.0"}').returncode == 0
