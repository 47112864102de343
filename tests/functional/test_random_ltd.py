"""Random-LTD functional ops: dispatch and refusals, GatherTokens / ScatterTokens semantics (DeepSpeed's), the
samplers (distribution, reproducibility, masks), input validation, and DeepSpeed's pure-python helpers."""

import math

import pytest
import torch

from fastlayers import backends
from fastlayers.functional import bert_sample_tokens, gpt_sample_tokens  # the samplers as the package exports them
from fastlayers.functional.random_ltd import GatherTokens, ScatterTokens, token_gather, token_scatter_
from fastlayers.reference.tokens import token_gather_ref, token_scatter_ref_
from tests.tolerances import assert_close

BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpreter)]
LAYOUTS = [True, False]
GRAD_FN = {"torch": "TokenGatherTorchFunctionBackward", "triton": "TokenGatherTritonFunctionBackward"}


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


def _indices(b, s, r, dtype=torch.int64):
    return torch.stack([torch.randperm(s)[:r].sort().values for _ in range(b)]).to(dtype)


def _act(b, s, c, batch_first, dtype=torch.float32, requires_grad=False):
    return torch.randn((b, s, c) if batch_first else (s, b, c), dtype=dtype, requires_grad=requires_grad)


def _backend_of(out):
    name = type(out.grad_fn).__name__
    return next((b for b, fn in GRAD_FN.items() if fn == name), "reference")


# -- dispatch --


def test_cpu_default_is_torch():
    x = _act(2, 6, 4, True, requires_grad=True)
    assert _backend_of(token_gather(x, _indices(2, 6, 3))) == "torch"
    text = backends.explain("token_gather", activations=x, indices=_indices(2, 6, 3), batch_first=True)
    assert "selected: torch" in text


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_explicit_triton_refused_on_cpu_without_interpreter(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, idx = _act(2, 6, 4, True), _indices(2, 6, 3)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1") as e:
        if op == "gather":
            token_gather(x, idx, backend="triton")
        else:
            token_scatter_(x, torch.randn(2, 3, 4), idx, backend="triton")
    assert "'triton'" in str(e.value) and f"token_{op}" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_explicit_triton_refuses_dtypes_the_interpreter_cannot_run(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(NotImplementedError, match="not supported"):
        token_gather(_act(2, 6, 4, True, dtype), _indices(2, 6, 3), backend="triton")


def test_env_backend_honoured(monkeypatch):
    x, idx = _act(2, 6, 4, True, requires_grad=True), _indices(2, 6, 3)
    monkeypatch.setenv("FASTLAYERS_BACKEND", "token_gather=reference")
    assert _backend_of(token_gather(x, idx)) == "reference"
    assert _backend_of(token_gather(x, idx, backend="torch")) == "torch"  # the keyword wins


@pytest.mark.interpreter
def test_env_backend_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTLAYERS_BACKEND", "token_gather=triton")
    x, idx = _act(2, 6, 4, True, requires_grad=True), _indices(2, 6, 3)
    out = token_gather(x, idx)
    assert _backend_of(out) == "triton"
    assert torch.equal(out, token_gather_ref(x, idx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_of_expanded_activations(backend):
    x = torch.randn(1, 6, 4).expand(3, 6, 4)  # stride-0 batch: rows alias
    idx = _indices(3, 6, 2)
    assert torch.equal(token_gather(x, idx, backend=backend), token_gather_ref(x, idx))


# -- GatherTokens / ScatterTokens: DeepSpeed's autograd pair --


def _layer(c):
    w = torch.randn(c, c) / math.sqrt(c)
    return lambda t: torch.tanh(t @ w) * 2.0


def _plain_ltd(x, idx, layer, batch_first):
    """Random-LTD in plain PyTorch: index the kept tokens, run the layer, index_put them back (autograd)."""
    xb = x if batch_first else x.transpose(0, 1)  # (B, S, C)
    rows = torch.arange(xb.shape[0])[:, None]
    out = xb.index_put((rows, idx.long()), layer(xb[rows, idx.long()]))
    return out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_gather_layer_scatter_gives_the_exact_gradient(backend, batch_first, idx_dtype):
    b, s, r, c = 3, 10, 4, 6
    layer = _layer(c)
    x = _act(b, s, c, batch_first, requires_grad=True)
    idx, _ = gpt_sample_tokens(r, s, b)
    idx = idx[0].to(idx_dtype)
    passthrough, part = GatherTokens.apply(x, idx, batch_first, backend)
    out = ScatterTokens.apply(passthrough, layer(part), idx, batch_first, backend)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    want = _plain_ltd(x, idx, layer, batch_first)
    (dx_want,) = torch.autograd.grad(want, x, g)
    assert_close(out, want, name="out")
    assert_close(dx, dx_want, kind="bwd", name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_scatter_tokens_alone_passes_the_whole_gradient_to_all(backend, batch_first):
    """DeepSpeed's semantics: grad(all) = out_grad unchanged, also at the overwritten (kept) positions, where the
    true gradient is 0; grad(part) = token_gather(out_grad)."""
    b, s, r, c = 2, 7, 3, 5
    all_ = _act(b, s, c, batch_first, requires_grad=True)
    part = _act(b, r, c, batch_first, requires_grad=True)
    idx = _indices(b, s, r, torch.int32)
    out = ScatterTokens.apply(all_, part, idx, batch_first, backend)
    assert torch.equal(out.detach(), token_scatter_ref_(all_.detach().clone(), part.detach(), idx, batch_first))
    assert not torch.equal(out.detach(), all_.detach())  # a scattered copy: `all` itself is unchanged
    g = torch.randn_like(out)
    d_all, d_part = torch.autograd.grad(out, (all_, part), g)
    assert torch.equal(d_all, g)
    assert torch.equal(d_part, token_gather_ref(g, idx, batch_first))
    # the mathematically exact gradient of all differs exactly at the kept positions (zeros there)
    exact = token_scatter_ref_(all_.clone(), part, idx, batch_first)  # index_put with autograd
    (d_exact,) = torch.autograd.grad(exact, all_, g)
    kept = token_gather_ref(d_exact, idx, batch_first)
    assert torch.equal(kept, torch.zeros_like(kept)) and not torch.equal(d_all, d_exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_gather_tokens_backward_overwrites_kept_positions(backend, batch_first):
    b, s, r, c = 2, 7, 3, 5
    x = _act(b, s, c, batch_first, requires_grad=True)
    idx = _indices(b, s, r)
    passthrough, part = GatherTokens.apply(x, idx, batch_first, backend)
    assert torch.equal(passthrough, x) and torch.equal(part, token_gather_ref(x, idx, batch_first))
    g_pass, g_part = torch.randn_like(passthrough), torch.randn_like(part)
    g_pass_before = g_pass.clone()
    (dx,) = torch.autograd.grad((passthrough, part), x, (g_pass, g_part))
    want = g_pass.clone()
    wb, pb = (want, g_part) if batch_first else (want.transpose(0, 1), g_part.transpose(0, 1))
    for i in range(b):
        wb[i, idx[i]] = pb[i]  # overwritten, not summed
    assert torch.equal(dx, want)
    assert torch.equal(g_pass, g_pass_before)  # the incoming gradient buffer is left alone
    # gathered output only (pass-through unused): the plain gather gradient
    _, part2 = GatherTokens.apply(x, idx, batch_first, backend)
    (dx2,) = torch.autograd.grad(part2, x, g_part)
    (dx2_want,) = torch.autograd.grad(token_gather_ref(x, idx, batch_first), x, g_part)
    assert torch.equal(dx2, dx2_want)


# -- token_scatter_ (no autograd) --


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_scatter_refuses_autograd_inputs(backend):
    x, idx = _act(2, 6, 4, True), _indices(2, 6, 3)
    part = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="token_scatter_ does not record autograd.*ScatterTokens.apply"):
        token_scatter_(x, part, idx, backend=backend)
    with torch.no_grad():
        assert token_scatter_(x, part, idx, backend=backend) is x
    assert torch.equal(token_gather_ref(x, idx), part.detach())


# -- samplers --


@pytest.mark.parametrize("sampler", [gpt_sample_tokens, bert_sample_tokens])
@pytest.mark.parametrize(("r", "s"), [(1, 9), (5, 9), (9, 9), (700, 2100)], ids=["R1", "R5", "RS", "R700S2100"])
def test_samples_sorted_distinct_in_range(sampler, r, s):
    mask = torch.zeros(4, 1, s, s)
    idx, _ = sampler(r, s, 4, layers=3, attn_mask=mask)
    assert idx.dtype == torch.int32 and idx.shape == (3, 4, r) and idx.device.type == "cpu"
    assert (idx[..., 1:] > idx[..., :-1]).all()  # sorted and distinct
    assert idx.min() >= 0 and idx.max() < s
    if r == s:
        assert torch.equal(idx, torch.arange(s, dtype=torch.int32).expand(3, 4, s))


def _chi2_uniform_subsets(idx: torch.Tensor, s: int, r: int) -> tuple[float, float]:
    """Pearson chi-square of the kept sets over all C(s, r) subsets, and its 1e-6 critical value."""
    codes = (1 << idx.long()).sum(-1).reshape(-1)  # each sorted row as a bitmask
    counts = torch.bincount(codes, minlength=1 << s).double()
    k = math.comb(s, r)
    seen = counts[counts > 0]
    assert seen.numel() <= k
    expected = codes.numel() / k
    stat = ((seen - expected) ** 2 / expected).sum().item() + (k - seen.numel()) * expected
    df = k - 1  # Wilson-Hilferty: chi2_df(1 - p) ~ df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3, z(1e-6) = 4.7534
    crit = df * (1 - 2 / (9 * df) + 4.7534 * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def test_sampling_is_uniform_over_subsets():
    s, r, n = 6, 2, 6000  # 15 subsets, 400 expected draws each
    idx, _ = gpt_sample_tokens(r, s, n)
    stat, crit = _chi2_uniform_subsets(idx, s, r)
    assert stat < crit, f"chi2 {stat:.1f} >= {crit:.1f}: not uniform over subsets"
    # the test has power: a mildly biased sampler (weights 1 .. 1.5) fails it
    biased = torch.multinomial(torch.linspace(1.0, 1.5, s).expand(n, s), r).sort(-1).values
    stat_b, _ = _chi2_uniform_subsets(biased, s, r)
    assert stat_b > crit, f"biased sampler passed: chi2 {stat_b:.1f} < {crit:.1f}"


def test_sampling_reproducible_with_manual_seed_and_generator():
    torch.manual_seed(1234)
    a, _ = gpt_sample_tokens(5, 20, 3, layers=2)
    torch.manual_seed(1234)
    b, _ = gpt_sample_tokens(5, 20, 3, layers=2)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    g1, _ = bert_sample_tokens(
        5, 20, 3, 2, "cpu", torch.zeros(3, 1, 20, 20), generator=torch.Generator().manual_seed(9)
    )
    g2, _ = gpt_sample_tokens(5, 20, 3, 2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(g1, g2)
    assert torch.equal(torch.get_rng_state(), state)  # a given generator leaves the global stream alone
    g3, _ = gpt_sample_tokens(5, 20, 3, 2, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(g1, g3)


def test_gpt_mask_is_the_leading_square():
    s, r = 10, 4
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]  # (1, 1, S, S), Megatron's shared mask
    idx, part = gpt_sample_tokens(r, s, 3, layers=2, attn_mask=causal)
    assert part.shape == (1, 1, r, r) and part.data_ptr() == causal.data_ptr()  # a view, as in DeepSpeed
    assert torch.equal(part, causal[:, :, :r, :r])
    # for a causal mask the leading square equals the gathered one (kept tokens are sorted)
    rows = idx[0, 1].long()
    assert torch.equal(part[0, 0], causal[0, 0][rows][:, rows])
    assert gpt_sample_tokens(r, s, 3)[1] is None


@pytest.mark.parametrize("layers", [1, 3])
def test_bert_masks_gather_rows_and_columns_per_layer(layers):
    b, s, r = 3, 9, 4
    mask = torch.randn(b, 1, s, s)
    idx, masks = bert_sample_tokens(r, s, b, layers=layers, attn_mask=mask)
    assert isinstance(masks, list) and len(masks) == layers
    for layer in range(layers):
        assert masks[layer].shape == (b, 1, r, r)
        for i in range(b):
            k = idx[layer, i].long()
            assert torch.equal(masks[layer][i, 0], mask[i, 0][k][:, k])


def test_bert_key_padding_and_shared_masks():
    b, s, r = 2, 8, 3
    pad = torch.randn(b, 1, 1, s)
    idx, (m,) = bert_sample_tokens(r, s, b, attn_mask=pad)
    assert m.shape == (b, 1, 1, r)
    assert torch.equal(m[1, 0, 0], pad[1, 0, 0, idx[0, 1].long()])
    shared = torch.randn(1, 2, s, s)
    idx, (m,) = bert_sample_tokens(r, s, b, attn_mask=shared)
    assert m.shape == (b, 2, r, r)
    k = idx[0, 1].long()
    assert torch.equal(m[1, 1], shared[0, 1][k][:, k])


# -- validation --


@pytest.mark.parametrize("sampler", [gpt_sample_tokens, bert_sample_tokens])
def test_sampler_size_errors(sampler):
    mask = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"reserved_length \(10\) must be <= seq_length \(8\)"):
        sampler(10, 8, 2, attn_mask=mask)
    with pytest.raises(ValueError, match="reserved_length must be >= 1, got 0"):
        sampler(0, 8, 2, attn_mask=mask)
    with pytest.raises(ValueError, match="seq_length must be >= 1, got 0"):
        sampler(1, 0, 2, attn_mask=mask)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        sampler(1, 8, -1, attn_mask=mask)
    with pytest.raises(ValueError, match="layers must be >= 1, got 0"):
        sampler(1, 8, 2, 0, attn_mask=mask)
    with pytest.raises(TypeError, match="reserved_length must be an int, got float 2.5"):
        sampler(2.5, 8, 2, attn_mask=mask)
    with pytest.raises(TypeError, match="batch_size must be an int, got bool True"):
        sampler(2, 8, True, attn_mask=mask)
    with pytest.raises(ValueError, match=r"seq_length must be <= 2\*\*24.*16777217"):
        sampler(2, 2**24 + 1, 2, attn_mask=mask)
    with pytest.raises(ValueError, match="device must be a torch.device or a device string, got 'gpu0'"):
        sampler(2, 8, 2, device="gpu0", attn_mask=mask)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        sampler(2, 8, 2, attn_mask=mask, generator=0)
    with pytest.raises(ValueError, match="generator is on cpu but device is meta"):
        sampler(2, 8, 2, device="meta", attn_mask=mask, generator=torch.Generator())


def test_sampler_mask_errors():
    with pytest.raises(ValueError, match=r"bert_sample_tokens requires attn_mask .* got None"):
        bert_sample_tokens(2, 8, 2)
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor, got list"):
        bert_sample_tokens(2, 8, 2, attn_mask=[[1.0]])
    bad = {
        "3-D": torch.zeros(2, 8, 8),
        "wrong S": torch.zeros(2, 1, 9, 9),
        "wrong batch": torch.zeros(3, 1, 8, 8),
        "wrong query dim": torch.zeros(2, 1, 4, 8),
    }
    for mask in bad.values():
        shape = str(tuple(mask.shape)).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=rf"bert_sample_tokens: attn_mask must have shape .* got {shape}"):
            bert_sample_tokens(2, 8, 2, attn_mask=mask)
        with pytest.raises(ValueError, match=rf"gpt_sample_tokens: attn_mask must have shape .* got {shape}"):
            gpt_sample_tokens(2, 8, 2, attn_mask=mask)
    # a key-padding mask has no query rows to slice a causal square from
    with pytest.raises(ValueError, match=r"gpt_sample_tokens: attn_mask must have shape \(B=2 or 1, H, 8, 8\)"):
        gpt_sample_tokens(2, 8, 2, attn_mask=torch.zeros(2, 1, 1, 8))


def test_gather_errors():
    x, idx = torch.randn(2, 6, 4), _indices(2, 6, 3)
    with pytest.raises(ValueError, match=r"activations must have 3 dims \(B, S, C\).*got shape \(12, 4\)"):
        token_gather(x.reshape(12, 4), idx)
    with pytest.raises(TypeError, match="activations must have dtype in .* got int64"):
        token_gather(torch.ones(2, 6, 4, dtype=torch.int64), idx)
    with pytest.raises(TypeError, match="indices must have dtype in .* got fp32"):
        token_gather(x, idx.float())
    with pytest.raises(ValueError, match=r"indices must have 2 dims \(B, R\), got shape \(6,\)"):
        token_gather(x, idx.reshape(-1))
    with pytest.raises(ValueError, match=r"indices has batch 3 .* activations \(2, 6, 4\) has batch 2"):
        token_gather(x, _indices(3, 6, 2))
    with pytest.raises(ValueError, match=r"indices has batch 2 .* activations \(2, 6, 4\) has batch 6 "):
        token_gather(x, idx, batch_first=False)  # (S, B, C) = (2, 6, 4): batch 6
    with pytest.raises(ValueError, match=r"indices must be in \[0, S=6\).*got min 0 and max 6"):
        token_gather(x, torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(ValueError, match=r"indices must be in \[0, S=6\).*got min -1"):
        token_gather(x, torch.tensor([[0, 1], [-1, 2]]))
    with pytest.raises(ValueError, match="indices is on meta but activations is on cpu"):
        token_gather(x, idx.to("meta"))
    with pytest.raises(TypeError, match="batch_first must be a bool, got int 1"):
        token_gather(x, idx, 1)
    with pytest.raises(ValueError, match="activations must have 3 dims"):
        GatherTokens.apply(x[0], idx, True)


def test_scatter_errors():
    x, idx = torch.randn(2, 6, 4), _indices(2, 6, 3)
    with pytest.raises(ValueError, match=r"part_activations must have shape \(2, 3, 4\).*got \(2, 3, 5\)"):
        token_scatter_(x, torch.randn(2, 3, 5), idx)
    with pytest.raises(ValueError, match=r"part_activations must have shape \(2, 6, 4\) \(\(R, B, C\)"):
        token_scatter_(torch.randn(2, 6, 4), torch.randn(6, 3, 4), _indices(6, 2, 2), batch_first=False)
    with pytest.raises(TypeError, match="part_activations has dtype fp16 but all_activations has fp32"):
        token_scatter_(x, torch.randn(2, 3, 4, dtype=torch.float16), idx)
    with pytest.raises(ValueError, match=r"indices must be in \[0, S=6\)"):
        token_scatter_(x, torch.randn(2, 3, 4), torch.tensor([[0, 1, 9], [0, 1, 2]]))
    with pytest.raises(ValueError, match=r"part_activations must have shape"):
        ScatterTokens.apply(x, torch.randn(2, 4, 4), idx, True)


# -- DeepSpeed's pure-python helpers (deepspeed installed with DS_BUILD_OPS=0; no CUDA op is imported) --


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_deepspeed_bsh_decoder_gather_and_scatter(backend):
    ds = pytest.importorskip("deepspeed.runtime.data_pipeline.data_routing.utils")
    b, s, r, c = 3, 12, 5, 7
    hidden = torch.randn(b, s, c)
    mask = torch.tril(torch.ones(s, s))[None, None].expand(b, 1, s, s)
    part_ds, rand_list, part_mask = ds.bsh_decoder_gather(r, hidden, mask)
    idx = torch.stack(rand_list)  # (B, R) int64, sorted per row
    assert torch.equal(token_gather(hidden, idx, backend=backend), part_ds)
    assert torch.equal(part_mask, gpt_sample_tokens(r, s, b, attn_mask=mask)[1])
    new_part = torch.randn(b, r, c)
    want = ds.bsh_decoder_scatter(hidden.clone(), new_part, rand_list)
    assert torch.equal(token_scatter_(hidden.clone(), new_part, idx, backend=backend), want)
