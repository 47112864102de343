"""Test set-up: the Triton interpreter on CPU, markers, a seed fixture, a device fixture."""

import os

import torch

# @triton.jit picks interpreter vs compiler when the decorator runs (kernel-module import), so this
# must happen before anything imports a fastlayers kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Import triton now, under the interpreter setting: if its first import happened inside a test that
# sets TRITON_INTERPRET=0, triton's own jit helpers (behind tl.sum etc.) would be built for the compiler
# and every later interpreted kernel would fail.
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError:
    pass

import pytest  # noqa: E402

FULL = os.environ.get("FASTLAYERS_TEST_FULL", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    skip_slow = pytest.mark.skip(reason="slow: set FASTLAYERS_TEST_FULL=1 (CI does) or pass -m slow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not FULL and "slow" not in markexpr:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
