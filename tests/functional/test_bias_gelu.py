"""bias_gelu / bias_gelu_linear: dispatch, refusals, FASTLAYERS_BACKEND, saved memory, input validation."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers import backends
from fastlayers.functional.bias_gelu import bias_gelu, bias_gelu_linear
from fastlayers.memory import saved_activation_bytes
from tests._elementwise_helpers import backend_of
from tests.tolerances import assert_close

GRAD_FN = {
    "bias_gelu": {"torch": "BiasGeluTorchFunctionBackward", "triton": "BiasGeluTritonFunctionBackward"},
    "bias_gelu_linear": {
        "torch": "BiasGeluLinearTorchFunctionBackward",
        "triton": "BiasGeluLinearTritonFunctionBackward",
    },
}


def _inputs(rows=6, n=40, m=24, dtype=torch.float32):
    x = torch.randn(rows, n, dtype=dtype, requires_grad=True)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    w = torch.randn(m, n, dtype=dtype, requires_grad=True)
    ob = torch.randn(m, dtype=dtype, requires_grad=True)
    return x, bias, w, ob


def _backend_of(out, op):
    return backend_of(out, GRAD_FN[op])


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


def test_cpu_default_is_torch():
    x, bias, w, ob = _inputs()
    assert _backend_of(bias_gelu(x, bias), "bias_gelu") == "torch"
    assert _backend_of(bias_gelu_linear(x, bias, w, ob), "bias_gelu_linear") == "torch"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_backend_works_and_agrees_with_torch(approximate):
    x, bias, w, ob = _inputs()
    y_ref = bias_gelu(x, bias, approximate=approximate, backend="reference")
    assert _backend_of(y_ref, "bias_gelu") == "reference"
    assert_close(y_ref, F.gelu(x + bias, approximate=approximate), name="y")
    assert_close(y_ref, bias_gelu(x, bias, approximate=approximate, backend="torch"), name="y vs torch")
    o_ref = bias_gelu_linear(x, bias, w, ob, approximate=approximate, checkpoint=True, backend="reference")
    assert _backend_of(o_ref, "bias_gelu_linear") == "reference"
    o_torch = bias_gelu_linear(x, bias, w, ob, approximate=approximate, backend="torch")
    assert_close(o_torch, o_ref, name="linear vs reference")


def test_reference_backend_supports_float64():
    x, bias, w, ob = _inputs(dtype=torch.float64)
    for backend in ("reference", "torch"):
        out = bias_gelu_linear(x, bias, w, ob, backend=backend)
        assert out.dtype == torch.float64
        assert_close(out, F.linear(F.gelu(x + bias), w, ob), name=backend)


@pytest.mark.parametrize("op", ["bias_gelu", "bias_gelu_linear"])
def test_explicit_triton_refused_on_cpu_without_interpreter(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, bias, w, ob = _inputs()
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1") as e:
        if op == "bias_gelu":
            bias_gelu(x, bias, backend="triton")
        else:
            bias_gelu_linear(x, bias, w, ob, backend="triton")
    assert "'triton'" in str(e.value) and op in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_explicit_triton_refuses_dtypes_the_interpreter_cannot_run(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, bias, _, _ = _inputs(dtype=dtype)
    with pytest.raises(NotImplementedError, match="not supported"):
        bias_gelu(x, bias, backend="triton")


def test_env_backend_honoured(monkeypatch):
    x, bias, w, ob = _inputs()
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    assert _backend_of(bias_gelu(x, bias), "bias_gelu") == "reference"
    assert _backend_of(bias_gelu_linear(x, bias, w, ob), "bias_gelu_linear") == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bias_gelu_linear=reference")
    assert _backend_of(bias_gelu(x, bias), "bias_gelu") == "torch"
    assert _backend_of(bias_gelu_linear(x, bias, w, ob), "bias_gelu_linear") == "reference"
    # the keyword wins over the environment
    assert _backend_of(bias_gelu_linear(x, bias, w, ob, backend="torch"), "bias_gelu_linear") == "torch"


@pytest.mark.interpreter
def test_env_backend_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bias_gelu=triton")
    x, bias, _, _ = _inputs()
    y = bias_gelu(x, bias, approximate="tanh")
    assert _backend_of(y, "bias_gelu") == "triton"
    assert_close(y, F.gelu(x + bias, approximate="tanh"), name="y")


def test_explain_lists_every_backend():
    x, bias, _, _ = _inputs()
    text = backends.explain("bias_gelu", x=x, bias=bias, approximate="tanh")
    assert "selected: torch" in text
    for name in ("reference", "torch", "triton"):
        assert name in text


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_saves_only_its_input(backend):
    x, bias, _, _ = _inputs()
    ours = saved_activation_bytes(lambda: bias_gelu(x, bias, backend=backend), exclude=(x, bias))
    peer = saved_activation_bytes(lambda: F.gelu(x + bias), exclude=(x, bias))
    assert ours == 0, f"saved {ours} bytes beyond x and bias"
    assert peer == x.numel() * x.element_size()  # eager keeps x + bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_checkpoint_saves_less_and_gives_identical_grads(backend, approximate):
    x, bias, w, ob = _inputs(rows=9, n=48, m=20)
    params = (x, bias, w, ob)

    def run(checkpoint):
        return bias_gelu_linear(x, bias, w, ob, approximate=approximate, checkpoint=checkpoint, backend=backend)

    saved_plain = saved_activation_bytes(lambda: run(False), exclude=params)
    saved_ckpt = saved_activation_bytes(lambda: run(True), exclude=params)
    act_bytes = x.numel() * x.element_size()
    assert saved_ckpt == 0, f"checkpoint=True saved {saved_ckpt} bytes beyond the inputs"
    assert saved_plain == act_bytes, f"checkpoint=False saved {saved_plain} bytes, expected the activation"

    dout = torch.randn(9, 20)
    results = []
    for checkpoint in (False, True):
        out = run(checkpoint)
        results.append([out.detach(), *torch.autograd.grad(out, params, dout)])
    for name, a, b in zip(("out", "dx", "dbias", "dweight", "dout_bias"), *results, strict=True):
        assert torch.equal(a, b), f"{name} differs between checkpoint=False and checkpoint=True"


def test_no_grad_saves_nothing_and_matches():
    x, bias, w, ob = _inputs()
    with torch.no_grad():
        out = bias_gelu_linear(x, bias, w, ob, checkpoint=True)
        assert out.grad_fn is None
    assert_close(out, F.linear(F.gelu(x + bias), w, ob), name="out")


def test_errors_bias_size():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\).*\(9,\)"):
        bias_gelu(x, torch.randn(9))
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\).*\(4, 10\)"):
        bias_gelu(x, torch.randn(4, 10))


def test_errors_weight_and_out_bias_shape():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"weight must have shape \(M, 10\).*\(6, 11\)"):
        bias_gelu_linear(x, None, torch.randn(6, 11))
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        bias_gelu_linear(x, None, torch.randn(10))
    with pytest.raises(ValueError, match=r"out_bias must have shape \(6,\).*\(10,\)"):
        bias_gelu_linear(x, None, torch.randn(6, 10), torch.randn(10))


@pytest.mark.parametrize("op", ["bias_gelu", "bias_gelu_linear"])
def test_errors_approximate(op):
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="'sigmoid'"):
        if op == "bias_gelu":
            bias_gelu(x, None, approximate="sigmoid", backend="torch")
        else:
            bias_gelu_linear(x, None, torch.randn(3, 10), approximate="sigmoid", backend="torch")


def test_errors_dtype_mismatch():
    x = torch.randn(4, 10)
    with pytest.raises(TypeError, match="bias has dtype fp16 but x has fp32"):
        bias_gelu(x, torch.randn(10, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight has dtype fp64 but x has fp32"):
        bias_gelu_linear(x, None, torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have dtype in"):
        bias_gelu(torch.ones(4, 10, dtype=torch.int64), None)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bias_gelu([1.0, 2.0], None)


def test_errors_device_mismatch():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        bias_gelu(x, torch.randn(10, device="meta"))
    with pytest.raises(ValueError, match="out_bias is on meta but x is on cpu"):
        bias_gelu_linear(x, None, torch.randn(3, 10), torch.randn(3, device="meta"))
