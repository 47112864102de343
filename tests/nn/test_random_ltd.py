"""RandomLayerTokenDrop: against DeepSpeed 0.19.6's wrapper (its CUDA ops replaced by ours), against a plain
index_select / index_copy reference with autograd, and its fixes (positional masks, draw order, positions,
outputs, checkpoints)."""

import copy

import pytest
import torch
from torch import nn

from fastlayers.functional import random_ltd as ours_ops
from fastlayers.nn.random_ltd import RandomLayerTokenDrop
from fastlayers.nn.random_ltd_scheduler import RandomLTDScheduler
from tests._random_ltd_helpers import make_config
from tests.tolerances import assert_close


def ltd_config(*, total, ids, model_type="decoder", order="batch_seq_dim", mask=True):
    """A small schedule (4 -> 12 tokens over 10 steps) for layers `ids` of `total`."""
    small = {"lo": 4, "hi": 12, "require": 10, "seq": 2, "gbs": 2}
    mask_name = "attention_mask" if mask else None
    return make_config(total=total, ids=ids, model_type=model_type, order=order, mask_name=mask_name, **small)


class TinyAttention(nn.Module):
    """A layer whose output depends on every token and on an additive (B, 1, Sq|1, S) mask (batch-first or
    seq-first hidden states); `scale` is a positional-or-keyword argument after the mask."""

    def __init__(self, c=8, batch_first=True):
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.batch_first = batch_first

    def forward(self, hidden_states, attention_mask=None, scale=1.0):
        x = hidden_states if self.batch_first else hidden_states.transpose(0, 1)
        q, k, v = self.qkv(x).chunk(3, -1)
        s = q @ k.transpose(-1, -2) * scale  # (B, S, S)
        if attention_mask is not None:
            s = s + attention_mask[:, 0]
        y = x + self.out(torch.softmax(s, -1) @ v)
        return y if self.batch_first else y.transpose(0, 1)


def causal_mask(b, s):
    m = torch.full((s, s), float("-inf")).triu(1)
    return m.expand(b, 1, s, s)


def padded_mask(b, s, lengths):
    keep = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    return torch.where(keep, 0.0, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)


def build(model_type, order, n=3, seed=0, c=8):
    torch.manual_seed(seed)
    layers = nn.ModuleList([TinyAttention(c, order == "batch_seq_dim") for _ in range(n)])
    cfg = ltd_config(total=n, ids=list(range(n)), model_type=model_type, order=order)
    sched = RandomLTDScheduler(cfg)
    wrapped = nn.ModuleList([RandomLayerTokenDrop(copy.deepcopy(m)) for m in layers])
    for i, w in enumerate(wrapped):
        w.init_config(cfg, sched, i)
    return layers, wrapped, sched, cfg


def run(stack, x, mask, positional=False):
    for layer in stack:
        x = layer(x, mask) if positional else layer(x, attention_mask=mask)
    return x


def reference(plain, x, mask, indices, batch_first):
    """gather -> layer -> scatter with index_select / index_copy (autograd), each layer its own kept tokens."""
    for layer, idx in zip(plain, indices, strict=True):
        xb = x if batch_first else x.transpose(0, 1)  # (B, S, C)
        outs = []
        for b in range(xb.shape[0]):
            i = idx[b].long()
            part = xb[b].index_select(0, i)[None]  # (1, R, C)
            m = None
            if mask is not None:
                mb = mask[b : b + 1]
                mb = mb.index_select(3, i)
                m = mb.index_select(2, i) if mb.shape[2] != 1 else mb
            y = layer(part if batch_first else part.transpose(0, 1), attention_mask=m)
            y = y if batch_first else y.transpose(0, 1)
            outs.append(xb[b].index_copy(0, i, y[0]))
        xb = torch.stack(outs)
        x = xb if batch_first else xb.transpose(0, 1)
    return x


@pytest.mark.parametrize("order", ["batch_seq_dim", "seq_batch_dim"])
@pytest.mark.parametrize("model_type,mask_kind", [("decoder", "causal"), ("decoder", None), ("encoder", "padded")])
def test_matches_index_reference_fwd_bwd(order, model_type, mask_kind):
    b, s, c = 3, 13, 8
    plain, wrapped, sched, _ = build(model_type, order, c=c)
    sched.set_current_seq(6)
    mask = {"causal": causal_mask(b, s), "padded": padded_mask(b, s, [13, 9, 5]), None: None}[mask_kind]
    batch_first = order == "batch_seq_dim"
    x = torch.randn((b, s, c) if batch_first else (s, b, c), requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    wrapped.train()
    y = run(wrapped, x, mask)
    indices = sched.state["sample_idx"]  # (L, B, R)
    assert indices.shape == (3, b, 6) and indices.dtype == torch.int32
    assert bool((indices[..., 1:] > indices[..., :-1]).all())  # sorted, distinct
    y_ref = reference(plain, x2, mask, indices, batch_first)
    assert_close(y, y_ref, torch.float32)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x2.grad, torch.float32)
    for p, q in zip(wrapped.parameters(), plain.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float32)


def test_causal_mask_gather_equals_deepspeed_leading_square():
    """DeepSpeed's decoder rule (leading R x R square of the causal mask) and ours (kept rows and columns) agree."""
    b, s, r = 2, 11, 5
    mask = causal_mask(b, s)
    idx, square = ours_ops.gpt_sample_tokens(r, s, b, 1, "cpu", mask)
    torch.manual_seed(0)
    _, gathered = ours_ops.bert_sample_tokens(r, s, b, 1, "cpu", mask)
    assert torch.equal(square.expand(b, 1, r, r), gathered[0])


def _deepspeed_layer(monkeypatch):
    basic = pytest.importorskip("deepspeed.runtime.data_pipeline.data_routing.basic_layer")
    for name in ("gpt_sample_tokens", "bert_sample_tokens", "GatherTokens", "ScatterTokens"):
        monkeypatch.setattr(basic, name, getattr(ours_ops, name))  # DeepSpeed's are CUDA extension ops
    ds_sched = pytest.importorskip("deepspeed.runtime.data_pipeline.data_routing.scheduler")
    return basic.RandomLayerTokenDrop, ds_sched.RandomLTDScheduler


@pytest.mark.parametrize("order", ["batch_seq_dim", "seq_batch_dim"])
@pytest.mark.parametrize("model_type,mask_kind", [("decoder", "causal"), ("encoder", "padded"), ("decoder", None)])
def test_matches_deepspeed_wrapper(monkeypatch, order, model_type, mask_kind):
    """Same seed, same scheduler steps: DeepSpeed 0.19.6's RandomLayerTokenDrop (its ops swapped for ours) and ours
    give the same tokens, outputs and gradients over several steps."""
    DsWrapper, DsScheduler = _deepspeed_layer(monkeypatch)
    b, s, c = 2, 12, 8
    plain, wrapped, sched, cfg = build(model_type, order, c=c)
    if mask_kind is None:
        cfg = dict(cfg, model_mask_name=None)
        for i, w in enumerate(wrapped):
            w.init_config(cfg, sched, i)
    ds_sched = DsScheduler(cfg)
    ds = nn.ModuleList([DsWrapper(copy.deepcopy(m)) for m in plain])
    for i, w in enumerate(ds):
        w.init_config(cfg, ds_sched, i)
    mask = {"causal": causal_mask(b, s), "padded": padded_mask(b, s, [12, 7]), None: None}[mask_kind]
    batch_first = order == "batch_seq_dim"
    for step in range(0, 12, 3):
        sched.update_seq(step)
        ds_sched.update_seq(step)
        assert sched.get_current_seq() == ds_sched.get_current_seq()
        x = torch.randn((b, s, c) if batch_first else (s, b, c))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        torch.manual_seed(step)
        ya = run(wrapped, xa, mask)
        torch.manual_seed(step)
        yb = run(ds, xb, mask)
        if sched.get_current_seq() < s:
            assert torch.equal(sched.state["sample_idx"], ds_sched.state["sample_idx"])
        assert_close(ya, yb, torch.float32)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad, torch.float32)


def test_positional_mask_and_extra_args():
    """HF 5.x layers get the mask positionally (DeepSpeed's wrapper took keywords only): it is found through the
    wrapped layer's signature and replaced by the kept part; later positional arguments pass through."""
    b, s, c = 2, 10, 8
    plain, wrapped, sched, _ = build("encoder", "batch_seq_dim", c=c)
    sched.set_current_seq(4)
    mask = padded_mask(b, s, [10, 6])
    x = torch.randn(b, s, c)
    torch.manual_seed(1)
    y_kw = run(wrapped, x, mask)
    torch.manual_seed(1)
    y_pos = run(wrapped, x, mask, positional=True)
    assert torch.equal(y_kw, y_pos)
    torch.manual_seed(1)
    y_scaled = wrapped[0](x, mask, 0.5)
    idx = sched.state["sample_idx"]
    ref = reference([lambda h, attention_mask: plain[0](h, attention_mask, 0.5)], x, mask, idx[:1], True)
    assert_close(y_scaled, ref, torch.float32)


def test_eval_and_full_length_are_the_plain_layer():
    b, s, c = 2, 9, 8
    plain, wrapped, sched, _ = build("decoder", "batch_seq_dim", c=c)
    x = torch.randn(b, s, c)
    mask = causal_mask(b, s)
    wrapped.eval()
    sched.set_current_seq(3)
    assert torch.equal(run(wrapped, x, mask), run(plain, x, mask))
    wrapped.train()
    sched.set_current_seq(s)  # keeps every token
    assert torch.equal(run(wrapped, x, mask), run(plain, x, mask))
    bare = RandomLayerTokenDrop(copy.deepcopy(plain[0]))  # no init_config: transparent
    assert torch.equal(bare(x, attention_mask=mask), plain[0](x, attention_mask=mask))


def test_later_layer_first_draws_for_all():
    """DeepSpeed needed LTD layer 0 to run first in every forward; ours draws when no draw fits the shape."""
    b, s, c = 2, 10, 8
    _, wrapped, sched, _ = build("decoder", "batch_seq_dim", c=c)
    sched.set_current_seq(4)
    x = torch.randn(b, s, c)
    y = wrapped[2](x, attention_mask=causal_mask(b, s))
    assert sched.state["sample_idx"].shape == (3, b, 4)
    assert y.shape == x.shape
    # a new shape makes the stored draw stale: drawn again
    x2 = torch.randn(b, s + 2, c)
    wrapped[1](x2, attention_mask=causal_mask(b, s + 2))
    assert sched.state["sample_idx"].shape == (3, b, 4)
    assert int(sched.state["sample_idx"].max()) < s + 2


class PosLayer(nn.Module):
    """Returns a tuple; adds the positions it is given, so gathering them is visible."""

    def forward(self, hidden_states, position_ids=None, position_embeddings=None):
        cos, sin = position_embeddings
        y = hidden_states + position_ids[..., None].to(hidden_states.dtype) + cos * sin
        return y, "extra"


def test_positions_are_gathered_and_tuples_kept():
    b, s, c = 2, 8, 4
    cfg = ltd_config(total=1, ids=[0], mask=False)
    sched = RandomLTDScheduler(cfg)
    w = RandomLayerTokenDrop(PosLayer())
    w.init_config(cfg, sched, 0)
    sched.set_current_seq(3)
    x = torch.zeros(b, s, c)
    pos = torch.arange(s)[None]  # (1, S): shared by the batch, as HF makes it
    cos, sin = torch.randn(1, s, c), torch.randn(1, s, c)
    y, tag = w(x, position_ids=pos, position_embeddings=(cos, sin))
    assert tag == "extra"
    idx = sched.state["sample_idx"][0].long()  # (B, R)
    for bi in range(b):
        kept = idx[bi]
        want = kept[:, None].float() + (cos[0] * sin[0])[kept]
        assert_close(y[bi, kept], want, torch.float32)
        dropped = torch.ones(s, dtype=torch.bool)
        dropped[kept] = False
        assert torch.equal(y[bi, dropped], x[bi, dropped])


class DictLayer(nn.Module):
    def forward(self, hidden_states):
        return {"h": hidden_states}


class ShrinkLayer(nn.Module):
    def forward(self, hidden_states):
        return hidden_states[:, :-1]


@pytest.mark.parametrize("layer,match", [(DictLayer(), "Tensor or a tuple"), (ShrinkLayer(), "keeps its input shape")])
def test_bad_layer_outputs(layer, match):
    cfg = ltd_config(total=1, ids=[0], mask=False)
    sched = RandomLTDScheduler(cfg)
    w = RandomLayerTokenDrop(layer)
    w.init_config(cfg, sched, 0)
    sched.set_current_seq(3)
    with pytest.raises((TypeError, ValueError), match=match):
        w(torch.randn(2, 6, 4))


def test_init_config_errors():
    cfg = ltd_config(total=5, ids=[1, 2, 3])
    sched = RandomLTDScheduler(cfg)
    w = RandomLayerTokenDrop(nn.Identity())
    with pytest.raises(ValueError, match="hidden_state_order.*'bsh'"):
        w.init_config(dict(cfg, hidden_state_order="bsh"), sched, 0)
    with pytest.raises(ValueError, match="model_type.*'seq2seq'"):
        w.init_config(dict(cfg, model_type="seq2seq"), sched, 0)
    with pytest.raises(ValueError, match=r"random_ltd_layer_id must be in \[0, 3\).*got 3"):
        w.init_config(cfg, sched, 3)
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        RandomLayerTokenDrop(lambda x: x)
    w.init_config(cfg, sched, 0)
    w.train()
    with pytest.raises(ValueError, match=r"3-D hidden_states, got \(4, 5\)"):
        w(torch.randn(4, 5))


def test_state_dict_keys_and_unwrapped_checkpoints():
    layer = TinyAttention()
    w = RandomLayerTokenDrop(copy.deepcopy(layer))
    assert set(w.state_dict()) == {f"random_ltd_layer.{k}" for k in layer.state_dict()}
    fresh = RandomLayerTokenDrop(TinyAttention())
    fresh.load_state_dict(layer.state_dict())  # a plain checkpoint loads into the wrapper
    for k, v in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[f"random_ltd_layer.{k}"], v)
    fresh.load_state_dict(w.state_dict())  # and the wrapped form too
