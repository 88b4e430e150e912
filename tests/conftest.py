"""Shared fixtures. HuggingFace (torch, CPU) is the reference; no hub is reachable,
so reference models are tiny random configs saved locally with save_pretrained."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

HAVE_TORCH = importlib.util.find_spec("torch") is not None

# 8 virtual CPU devices for the sharding tests (test_sharding.py). XLA reads this when
# jax starts its CPU backend, so it must be set before any test touches a device.
# Unsharded code still runs on device 0 alone.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Every model the tests build runs its layers as one scan over the stacked weights: the
# path accelerators run. The CPU default (the stack split per layer, an unrolled loop)
# is checked against it in test_generate.py::test_layer_loops_agree.
os.environ.setdefault("FTJAX_LAYER_LOOP", "scan")


def pytest_collection_modifyitems(config, items):
    if HAVE_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch (the HuggingFace reference)")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)
