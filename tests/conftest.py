"""Shared fixtures. HuggingFace (torch, CPU) is the reference; no hub is reachable,
so reference models are tiny random configs saved locally with save_pretrained."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config, items):
    if HAVE_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch (the HuggingFace reference)")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)
