"""Shared fixtures. Tests marked `kernel` need root and a BPF-capable kernel; CI runs as root."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root and a BPF-capable kernel (CI runs as root)")
    for item in items:
        if "kernel" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pin_root() -> Iterator[str]:
    """A private bpffs directory for one test's pinned maps, removed afterwards."""
    from pycilium.bpf.loader import remove_pin_root

    root = f"/sys/fs/bpf/pyc-test-{uuid.uuid4().hex[:8]}"
    try:
        yield root
    finally:
        remove_pin_root(root)
