"""Test configuration.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set before any
`@triton.jit` function is defined, i.e. before loranull_kernels is imported, hence here at collection time.
"""
import os
import random
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LORANULL_POISON_OUTPUTS", "1")  # any output element a kernel forgets to write is NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Fresh inputs every session; a failure prints the seed, and LORANULL_TEST_SEED=<seed> replays it.
BASE_SEED = int(os.environ.get("LORANULL_TEST_SEED", random.randrange(2**31)))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch per test from the session's base seed and the test's id."""
    torch.manual_seed((BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"replay with LORANULL_TEST_SEED={BASE_SEED}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    saved = sys.modules.get("tests.quantized_models")
    if saved is not None:  # the tiny models saved for the quantized-base tests
        saved.clear()
