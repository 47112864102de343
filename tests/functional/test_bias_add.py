"""nhwc_bias_add: dispatch, refusals (inference-only Triton, layout), FASTLAYERS_BACKEND, input validation."""

import pytest
import torch

from fastlayers import backends
from fastlayers.functional import bias_add as mod
from fastlayers.functional.bias_add import nhwc_bias_add
from tests.tolerances import assert_close

CL = torch.channels_last


def _inputs(c=6, dtype=torch.float32, requires_grad=False):
    act = torch.randn(2, c, 3, 4, dtype=dtype).contiguous(memory_format=CL).requires_grad_(requires_grad)
    return act, torch.randn(c, dtype=dtype), torch.randn(2, c, 3, 4, dtype=dtype), torch.randn(c, dtype=dtype)


def _eager(act, bias, other=None, other_bias=None):
    out = act + bias.view(1, -1, 1, 1)
    if other is not None:
        out = out + other
    if other_bias is not None:
        out = out + other_bias.view(1, -1, 1, 1)
    return out


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


@pytest.fixture
def spy(monkeypatch):
    """Records which backend ran: wraps the registered callables (resolved by name on every call)."""
    calls = []

    def wrap(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)

        return run

    monkeypatch.setattr(mod, "_torch_impl", wrap("torch", mod._torch_impl))
    monkeypatch.setattr(mod, "_triton_impl", wrap("triton", mod._triton_impl))
    import fastlayers.reference.bias_add as ref_mod

    monkeypatch.setattr(ref_mod, "nhwc_bias_add_ref", wrap("reference", ref_mod.nhwc_bias_add_ref))
    return calls


def test_cpu_default_is_torch(spy):
    act, bias, other, other_bias = _inputs()
    out = nhwc_bias_add(act, bias, other, other_bias)
    assert spy == ["torch"]
    assert_close(out, _eager(act, bias, other, other_bias), name="out")


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_explicit_backend_runs(spy, monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    act, bias, other, other_bias = _inputs()
    out = nhwc_bias_add(act, bias, other, other_bias, backend=backend)
    assert spy == [backend]
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, _eager(act, bias, other, other_bias), name=backend)


def test_env_backend_honoured(spy, monkeypatch):
    act, bias, _, _ = _inputs()
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    nhwc_bias_add(act, bias)
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bias_gelu=reference")
    nhwc_bias_add(act, bias)
    monkeypatch.setenv("FASTLAYERS_BACKEND", "nhwc_bias_add=reference")
    nhwc_bias_add(act, bias)
    nhwc_bias_add(act, bias, backend="torch")  # the keyword wins over the environment
    assert spy == ["reference", "torch", "reference", "torch"]


def test_reference_and_torch_support_float64():
    act, bias, other, other_bias = _inputs(dtype=torch.float64)
    for backend in ("reference", "torch"):
        out = nhwc_bias_add(act, bias, other, other_bias, backend=backend)
        assert out.dtype == torch.float64
        assert_close(out, _eager(act, bias, other, other_bias), name=backend)


def test_explicit_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    act, bias, _, _ = _inputs()
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1") as e:
        nhwc_bias_add(act, bias, backend="triton")
    assert "'triton'" in str(e.value) and "nhwc_bias_add" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_explicit_triton_refuses_dtypes_the_interpreter_cannot_run(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    act, bias, _, _ = _inputs(dtype=dtype)
    with pytest.raises(NotImplementedError, match="not supported"):
        nhwc_bias_add(act, bias, backend="triton")


def test_triton_is_inference_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    act, bias, other, _ = _inputs(requires_grad=True)
    with pytest.raises(NotImplementedError, match="inference-only"):
        nhwc_bias_add(act, bias, other, backend="triton")
    with pytest.raises(NotImplementedError, match="inference-only"):
        nhwc_bias_add(act.detach(), bias.requires_grad_(), backend="triton")


@pytest.mark.interpreter
def test_triton_runs_requires_grad_inputs_under_no_grad(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    act, bias, other, _ = _inputs(requires_grad=True)
    with torch.no_grad():
        out = nhwc_bias_add(act, bias, other, backend="triton")
    assert out.grad_fn is None
    assert_close(out, _eager(act, bias, other).detach(), name="out")


def test_triton_refuses_non_channels_last_4d_with_a_hint(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    act = torch.randn(2, 6, 3, 4)  # NCHW contiguous
    with pytest.raises(NotImplementedError, match=r"channels_last contiguous.*\.contiguous\(memory_format=torch"):
        nhwc_bias_add(act, torch.randn(6), backend="triton")
    assert "nhwc_bias_add" in backends.explain("nhwc_bias_add", activation=act, bias=torch.randn(6))


def test_non_channels_last_4d_accepted_by_torch_and_keeps_layout(spy):
    act = torch.randn(2, 6, 3, 4)
    bias = torch.randn(6)
    out = nhwc_bias_add(act, bias)
    assert spy == ["torch"] and out.is_contiguous()
    assert_close(out, _eager(act, bias), name="out")


def test_torch_backend_gradients_flow(spy):
    act, bias, other, other_bias = _inputs(requires_grad=True)
    bias.requires_grad_()
    out = nhwc_bias_add(act, bias, other, other_bias)
    assert spy == ["torch"] and out.requires_grad
    out.sum().backward()
    assert torch.equal(act.grad, torch.ones_like(act))
    assert torch.equal(bias.grad, torch.full((6,), 24.0))


def test_explain_lists_every_backend():
    act, bias, _, _ = _inputs()
    text = backends.explain("nhwc_bias_add", activation=act, bias=bias)
    assert "selected: torch" in text
    for name in ("reference", "torch", "triton"):
        assert name in text


def test_no_grad_matches():
    act, bias, other, other_bias = _inputs()
    with torch.no_grad():
        out = nhwc_bias_add(act, bias, other, other_bias)
    assert out.grad_fn is None
    assert_close(out, _eager(act, bias, other, other_bias), name="out")


# -- input validation (before any backend runs) --


def test_errors_dims():
    with pytest.raises(ValueError, match=r"4-D NCHW \(channels_last\) or 3-D \(B, S, C\), got 2-D shape \(4, 6\)"):
        nhwc_bias_add(torch.randn(4, 6), torch.randn(6))
    with pytest.raises(ValueError, match=r"got 5-D shape \(1, 2, 3, 4, 5\)"):
        nhwc_bias_add(torch.randn(1, 2, 3, 4, 5), torch.randn(2))


def test_errors_bias_length():
    act, _, _, _ = _inputs(c=6)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(4,\)"):
        nhwc_bias_add(act, torch.randn(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\), got \(1, 5\)"):
        nhwc_bias_add(torch.randn(2, 3, 5), torch.randn(1, 5))
    with pytest.raises(ValueError, match=r"other_bias must have shape \(6,\), got \(7,\)"):
        nhwc_bias_add(act, torch.randn(6), torch.randn(act.shape), torch.randn(7))


def test_errors_other():
    act, bias, _, other_bias = _inputs(c=6)
    with pytest.raises(ValueError, match=r"other must have shape \(2, 6, 3, 4\), got \(2, 6, 4, 3\)"):
        nhwc_bias_add(act, bias, torch.randn(2, 6, 4, 3))
    with pytest.raises(ValueError, match="other_bias was given without other"):
        nhwc_bias_add(act, bias, None, other_bias)


def test_errors_dtype():
    act, bias, other, other_bias = _inputs()
    with pytest.raises(TypeError, match="bias has dtype fp16 but activation has fp32"):
        nhwc_bias_add(act, bias.half())
    with pytest.raises(TypeError, match="other has dtype bf16 but activation has fp32"):
        nhwc_bias_add(act, bias, other.bfloat16())
    with pytest.raises(TypeError, match="other_bias has dtype fp64 but activation has fp32"):
        nhwc_bias_add(act, bias, other, other_bias.double())
    with pytest.raises(TypeError, match="activation must have dtype in"):
        nhwc_bias_add(torch.ones(1, 2, 3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="activation must be a torch.Tensor"):
        nhwc_bias_add([1.0], bias)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        nhwc_bias_add(act, [0.0] * 6)


def test_errors_device():
    act, bias, _, _ = _inputs()
    with pytest.raises(ValueError, match="bias is on meta but activation is on cpu"):
        nhwc_bias_add(act, bias.to("meta"))
