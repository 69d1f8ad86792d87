"""Fixtures of the CNI tests: a node netns running the agent's CNI API (see helpers.Node)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cni.helpers import Node


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    n = Node()
    try:
        yield n
    finally:
        n.close()
