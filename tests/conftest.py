"""Fixtures and import path shared by every test folder (tests/, tests/gpu/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # tests/gpu/ imports tests/support and tests/test_ops too
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def adir(request, tmp_path_factory):
    """A folder for the adapters one test module writes (shared by its tests)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
