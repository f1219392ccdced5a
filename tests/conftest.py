"""Test options: ``--runslow`` also runs the tests marked ``slow`` (the long property-based runs)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (e.g. thousands of random loop programs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test, run only with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
