"""The conflist and plugin binary the agent installs on the node."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from pycilium.agent.cniapi import install_cni_binary, install_cni_config, remove_cni_config
from pycilium.agent.config import AgentConfig


def _config(tmp: Path, **kw: object) -> AgentConfig:
    return AgentConfig(cni_conf_dir=str(tmp / "net.d"), cni_bin_dir=str(tmp / "bin"), state_dir=str(tmp / "state"),
                       cni_socket_path=str(tmp / "state" / "cni.sock"), cni_log_file=str(tmp / "cni.log"),
                       mtu=1400, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_conflist_content(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    path = install_cni_config(cfg)
    assert path == tmp_path / "net.d" / "05-pycilium.conflist"
    assert path.stat().st_mode & 0o777 == 0o644
    conf = json.loads(path.read_text())
    assert conf == {
        "cniVersion": "1.1.0",
        "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        "name": "pycilium",
        "plugins": [{"type": "pycilium-cni", "mtu": 1400, "log-file": str(tmp_path / "cni.log"),
                     "agent-socket": str(tmp_path / "state" / "cni.sock"),
                     "delete-queue-dir": str(tmp_path / "state" / "delete-queue")}],
    }  # fmt: skip
    # rewriting identical content leaves the file alone (containerd watches the directory)
    ino = path.stat().st_ino
    install_cni_config(cfg)
    assert path.stat().st_ino == ino
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


def test_conflist_mtu_leaves_room_for_the_tunnel(tmp_path: Path) -> None:
    cfg = _config(tmp_path, routing_mode="tunnel")
    conf = json.loads(install_cni_config(cfg).read_text())
    assert conf["plugins"][0]["mtu"] == 1400 - 50


def test_exclusive_mode_disables_other_configs_and_remove_restores(tmp_path: Path) -> None:
    d = tmp_path / "net.d"
    d.mkdir()
    (d / "10-flannel.conflist").write_text("{}")
    (d / "99-loopback.conf").write_text("{}")
    (d / "README").write_text("not a config")
    cfg = _config(tmp_path, cni_exclusive=True)
    install_cni_config(cfg)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["05-pycilium.conflist", "10-flannel.conflist.pycilium_bak", "99-loopback.conf.pycilium_bak",
                     "README"]  # fmt: skip
    assert remove_cni_config(cfg, restore_backups=True)
    assert sorted(p.name for p in d.iterdir()) == ["10-flannel.conflist", "99-loopback.conf", "README"]
    assert not remove_cni_config(cfg)


def test_non_exclusive_mode_keeps_other_configs(tmp_path: Path) -> None:
    d = tmp_path / "net.d"
    d.mkdir()
    (d / "10-other.conflist").write_text("{}")
    install_cni_config(_config(tmp_path))
    assert (d / "10-other.conflist").exists()


def test_binary_is_self_contained_and_replaced_atomically(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    path = install_cni_binary(cfg)
    assert path == tmp_path / "bin" / "pycilium-cni" and os.access(path, os.X_OK)
    ino = path.stat().st_ino
    assert install_cni_binary(cfg).stat().st_ino == ino  # unchanged content: not rewritten
    # runs from anywhere, with an empty environment, from a copy outside the source tree
    copy = tmp_path / "elsewhere" / "pycilium-cni"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    copy.chmod(0o755)
    proc = subprocess.run([str(copy)], env={"CNI_COMMAND": "VERSION"}, input=b"", capture_output=True,
                          cwd="/", timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["supportedVersions"][-1] == "1.1.0"


def test_binary_falls_back_to_another_interpreter(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    from pycilium.agent.cniapi.install import build_launcher

    path = tmp_path / "pycilium-cni"
    path.write_bytes(build_launcher("/nonexistent/python3"))
    path.chmod(0o755)
    proc = subprocess.run(
        [str(path)], env={"CNI_COMMAND": "VERSION"}, input=b"", capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert cfg.cni_bin_dir  # config unaffected
