"""Fixtures of the CNI tests: a node netns running the agent's CNI API (see helpers.Node)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cni.helpers import Node


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """The node of tests marked `kernel` (root; tests/conftest.py skips them only without root)."""
    n = Node()
    try:
        yield n
    finally:
        n.close()
