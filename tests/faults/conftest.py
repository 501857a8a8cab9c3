"""The fault suite runs in two sizes.

Every test here runs in CI (``make test``) at a size that fits in a few minutes in
total.  Tests marked ``faults_full`` are the full-size variants (50,000 readings,
outages of minutes); they are skipped unless ``FAULTS_FULL=1``, which ``make faults``
sets.
"""

from __future__ import annotations

import os

import pytest

FULL = os.environ.get("FAULTS_FULL") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults_full: full-size fault test, run by `make faults` (FAULTS_FULL=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL:
        return
    skip = pytest.mark.skip(reason="full-size fault test: run `make faults`")
    for item in items:
        if "faults_full" in item.keywords:
            item.add_marker(skip)
