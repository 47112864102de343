"""bias_geglu: dispatch, refusals, FASTLAYERS_BACKEND, saved memory, input validation."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers import backends
from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.memory import saved_activation_bytes
from tests._elementwise_helpers import backend_of
from tests.tolerances import assert_close

GRAD_FN = {"torch": "BiasGegluTorchFunctionBackward", "triton": "BiasGegluTritonFunctionBackward"}
TORCH_ACT = {"gelu": F.gelu, "silu": F.silu}


def _inputs(rows=6, c=20, dtype=torch.float32):
    x = torch.randn(rows, 2 * c, dtype=dtype, requires_grad=True)
    bias = torch.randn(2 * c, dtype=dtype, requires_grad=True)
    return x, bias


def _eager(x, bias, activation="gelu"):
    h, g = (x + bias).chunk(2, dim=-1)
    return h * TORCH_ACT[activation](g)


def _backend_of(out):
    return backend_of(out, GRAD_FN)


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


def test_cpu_default_is_torch():
    x, bias = _inputs()
    assert _backend_of(bias_geglu(x, bias)) == "torch"


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_reference_backend_works_and_agrees_with_torch(activation):
    x, bias = _inputs()
    y_ref = bias_geglu(x, bias, activation=activation, backend="reference")
    assert _backend_of(y_ref) == "reference"
    assert_close(y_ref, _eager(x, bias, activation), name="y")
    assert_close(y_ref, bias_geglu(x, bias, activation=activation, backend="torch"), name="y vs torch")


def test_reference_and_torch_support_float64():
    x, bias = _inputs(dtype=torch.float64)
    for backend in ("reference", "torch"):
        out = bias_geglu(x, bias, backend=backend)
        assert out.dtype == torch.float64
        assert_close(out, _eager(x, bias), name=backend)


def test_explicit_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, bias = _inputs()
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1") as e:
        bias_geglu(x, bias, backend="triton")
    assert "'triton'" in str(e.value) and "bias_geglu" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_explicit_triton_refuses_dtypes_the_interpreter_cannot_run(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, bias = _inputs(dtype=dtype)
    with pytest.raises(NotImplementedError, match="not supported"):
        bias_geglu(x, bias, backend="triton")


def test_env_backend_honoured(monkeypatch):
    x, bias = _inputs()
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    assert _backend_of(bias_geglu(x, bias)) == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bias_gelu=reference")
    assert _backend_of(bias_geglu(x, bias)) == "torch"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bias_geglu=reference")
    assert _backend_of(bias_geglu(x, bias)) == "reference"
    # the keyword wins over the environment
    assert _backend_of(bias_geglu(x, bias, backend="torch")) == "torch"


@pytest.mark.interpreter
def test_env_backend_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bias_geglu=triton")
    x, bias = _inputs()
    y = bias_geglu(x, bias, activation="silu")
    assert _backend_of(y) == "triton"
    assert_close(y, _eager(x, bias, "silu"), name="y")


def test_explain_lists_every_backend():
    x, bias = _inputs()
    text = backends.explain("bias_geglu", x=x, bias=bias, activation="gelu")
    assert "selected: torch" in text
    for name in ("reference", "torch", "triton"):
        assert name in text


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_geglu_saves_only_its_inputs(backend, has_bias):
    x, bias = _inputs()
    bias = bias if has_bias else None
    inputs = (x, bias) if has_bias else (x,)
    ours = saved_activation_bytes(lambda: bias_geglu(x, bias, backend=backend), exclude=inputs)
    assert ours == 0, f"saved {ours} bytes beyond x and bias"
    if has_bias:
        peer = saved_activation_bytes(lambda: _eager(x, bias), exclude=inputs)
        # eager keeps x + bias (2C, the gate is a view of it) and gelu(gate) (C)
        assert peer == 3 * x.numel() * x.element_size() // 2


def test_no_grad_saves_nothing_and_matches():
    x, bias = _inputs()
    with torch.no_grad():
        out = bias_geglu(x, bias)
        assert out.grad_fn is None
    assert_close(out, _eager(x, bias), name="out")


def test_errors_odd_last_dim():
    with pytest.raises(ValueError, match=r"x must have an even last dim.*\(4, 9\)"):
        bias_geglu(torch.randn(4, 9), None)
    with pytest.raises(ValueError, match="at least 1 dim"):
        bias_geglu(torch.tensor(1.0), None)


def test_errors_bias_shape():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\).*\(5,\)"):
        bias_geglu(x, torch.randn(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\).*\(4, 10\)"):
        bias_geglu(x, torch.randn(4, 10))


def test_errors_activation():
    with pytest.raises(ValueError, match="activation must be one of.*'relu'"):
        bias_geglu(torch.randn(4, 10), None, activation="relu", backend="torch")


def test_errors_dtype():
    x = torch.randn(4, 10)
    with pytest.raises(TypeError, match="bias has dtype fp16 but x has fp32"):
        bias_geglu(x, torch.randn(10, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must have dtype in"):
        bias_geglu(torch.ones(4, 10, dtype=torch.int64), None)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bias_geglu([1.0, 2.0], None)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        bias_geglu(x, [0.0] * 10)


def test_errors_device_mismatch():
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        bias_geglu(torch.randn(4, 10), torch.randn(10, device="meta"))
