"""Dispatch rules of fastlayers.backends, on a toy op registered by the test."""

import pytest
import torch

from fastlayers import backends
from fastlayers.backends import Impl


def _double(x):
    return 2 * x


@pytest.fixture(scope="module", autouse=True)
def toy_op():
    backends.register(Impl("toy_double", "reference", "tests.functional.test_backends:_double"))
    backends.register(
        Impl(
            "toy_double",
            "torch",
            "tests.functional.test_backends:_double",
            dtypes=frozenset({torch.float32}),
            check=lambda x, **kw: ["x must be 2-D"] if x.dim() != 2 else [],
        )
    )
    backends.register(Impl("toy_double", "triton", "tests.functional.test_backends:_double", supports_backward=False))
    yield
    backends._REGISTRY.pop("toy_double")


def test_priority_on_cpu_prefers_torch_then_reference(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    x = torch.randn(3, 4)
    assert backends.select("toy_double", x=x).name == "torch"
    # torch refuses fp64 and 3-D -> reference
    assert backends.select("toy_double", x=x.double()).name == "reference"
    assert backends.select("toy_double", x=torch.randn(2, 3, 4)).name == "reference"


def test_triton_never_chosen_automatically_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select("toy_double", x=torch.randn(3, 4)).name == "torch"
    assert backends.select("toy_double", "triton", x=torch.randn(3, 4)).name == "triton"


def test_explicit_backend_that_cannot_run_lists_reasons(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    with pytest.raises(NotImplementedError, match="dtype fp64 not supported"):
        backends.select("toy_double", "torch", x=torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="x must be 2-D"):
        backends.select("toy_double", "torch", x=torch.randn(2, 3, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        backends.select("toy_double", "triton", x=torch.randn(3, 4))


def test_inference_only_backend_refuses_grad(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="inference-only"):
        backends.select("toy_double", "triton", x=x)
    with torch.no_grad():
        assert backends.select("toy_double", "triton", x=x).name == "triton"


def test_env_var_single_and_per_op(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    assert backends.select("toy_double", x=x).name == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "other_op=torch,toy_double=reference")
    assert backends.select("toy_double", x=x).name == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "other_op=reference")
    assert backends.select("toy_double", x=x).name == "torch"
    # the keyword wins over the environment
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    assert backends.select("toy_double", "torch", x=x).name == "torch"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "cuda_magic")
    with pytest.raises(ValueError, match="unknown backend 'cuda_magic'"):
        backends.select("toy_double", x=x)


def test_unknown_op_and_missing_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        backends.select("nope", x=torch.randn(2))
    backends._REGISTRY["toy_double"].pop("triton")
    try:
        with pytest.raises(NotImplementedError, match="has no 'triton' backend"):
            backends.select("toy_double", "triton", x=torch.randn(2, 2))
    finally:
        backends.register(
            Impl("toy_double", "triton", "tests.functional.test_backends:_double", supports_backward=False)
        )


def test_explain_shows_the_decision(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    text = backends.explain("toy_double", x=torch.randn(3, 4, dtype=torch.float64))
    assert "selected: reference" in text
    assert "torch" in text and "dtype fp64 not supported" in text
    assert "interpreter" in text
    assert backends.select("toy_double", x=torch.randn(3, 4)).resolve()(torch.ones(1)).item() == 2.0
