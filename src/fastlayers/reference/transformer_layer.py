"""Readable reference of the BERT-style training transformer layer (DeepSpeed's `DeepSpeedTransformerLayer` maths).

Plain PyTorch, any float dtype (float64 included), autograd for free. It is the spec that
`fastlayers.nn.transformer_layer.TransformerLayer` is tested against. Parameter names and layouts are DeepSpeed's
(see `PARAM_SHAPES`); `norm_w/norm_b` is the *input* LayerNorm in pre-LN mode and the *output* LayerNorm in post-LN
mode, `attn_nw/attn_nb` is the LayerNorm after the attention residual in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PARAM_NAMES = ("attn_qkvw", "attn_qkvb", "attn_ow", "attn_ob", "attn_nw", "attn_nb",
               "inter_w", "inter_b", "output_w", "output_b", "norm_w", "norm_b")  # fmt: skip


def param_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """Shape of each parameter; weights are [out, in] as nn.Linear (y = x @ W.T + b)."""
    H, I = hidden, intermediate
    return {
        "attn_qkvw": (3 * H, H),  # rows [0,H) = Q, [H,2H) = K, [2H,3H) = V
        "attn_qkvb": (3 * H,),
        "attn_ow": (H, H),
        "attn_ob": (H,),
        "attn_nw": (H,),
        "attn_nb": (H,),
        "inter_w": (I, H),
        "inter_b": (I,),
        "output_w": (H, I),
        "output_b": (H,),
        "norm_w": (H,),
        "norm_b": (H,),
    }


def _dropout(t: torch.Tensor, p: float, keep: torch.Tensor | None, site: str) -> torch.Tensor:
    """Inverted dropout with an explicit keep mask (True = keep, scale 1/(1-p)); identity when p == 0."""
    if p == 0.0:
        return t
    if keep is None:
        raise ValueError(f"dropout_p={p} > 0 needs keep_masks[{site!r}] (the reference draws no random numbers)")
    return t * keep.to(t.dtype) / (1.0 - p)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + bias) (dropped) @ v; rows whose every score is -inf give zeros.

    Args:
        q, k, v: (B, h, S, d).
        bias: additive, broadcastable to (B, h, S, S) (e.g. (B, 1, 1, S) padding mask), or None.
        keep: (B, h, S, S) bool keep mask when dropout_p > 0.
    Returns:
        (B, h, S, d).
    """
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, h, S, S)
    if bias is not None:
        scores = scores + bias
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")  # fully masked rows: softmax would be 0/0
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    probs = _dropout(probs, dropout_p, keep, "attn")
    return probs @ v


def transformer_layer_ref(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    heads: int,
    attention_mask: torch.Tensor | None = None,
    pre_layer_norm: bool = True,
    eps: float = 1e-12,
    gelu_approximate: str = "none",
    attn_dropout_p: float = 0.0,
    hidden_dropout_p: float = 0.0,
    keep_masks: dict[str, torch.Tensor] | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """One BERT-style layer, in DeepSpeed's op order.

    Pre-LN (`pre_layer_norm=True`)::

        h   = x + drop(LN(x; norm) @ Wqkv ... attention ... @ Wo + bo)
        out = h + drop(gelu(LN(h; attn_n) @ Wi + bi) @ Wout + bout)        (no final LN inside the layer)

    Post-LN (BERT)::

        h   = LN(x + drop(attention(x) @ Wo + bo); attn_n)
        out = LN(h + drop(gelu(h @ Wi + bi) @ Wout + bout); norm)

    Args:
        x: (B, S, H).
        params: the twelve DeepSpeed parameters by name (`PARAM_NAMES`, shapes in `param_shapes`).
        heads: h; head dim d = H / h.
        attention_mask: additive mask broadcastable to (B, h, S, S) (DeepSpeed's (B, 1, 1, S) of 0 / -10000,
            HF's (B, 1, S, S) of 0 / finfo.min), or None.
        gelu_approximate: "none" (erf) or "tanh".
        attn_dropout_p, hidden_dropout_p: dropout probabilities; when > 0, `keep_masks` must hold the keep masks
            (True = keep) "attn" (B, h, S, S), "attn_out" (B, S, H) and "ffn_out" (B, S, H).
        upcast: compute in float32 and cast the result back to x.dtype.
    Returns:
        (B, S, H), dtype of x.
    """
    dtype = x.dtype
    if upcast:
        x = x.float()
        params = {n: p.float() for n, p in params.items()}
        attention_mask = None if attention_mask is None else attention_mask.float()
    keep_masks = keep_masks or {}
    P = params
    B, S, H = x.shape
    d = H // heads

    def ln(t, w, b):
        return F.layer_norm(t, (H,), w, b, eps)

    def attention_block(t):  # (B, S, H) -> (B, S, H), before the output bias
        qkv = F.linear(t, P["attn_qkvw"], P["attn_qkvb"])  # (B, S, 3H)
        q, k, v = qkv.view(B, S, 3, heads, d).permute(2, 0, 3, 1, 4)  # each (B, h, S, d)
        ctx = _attention(q, k, v, attention_mask, dropout_p=attn_dropout_p, keep=keep_masks.get("attn"))
        ctx = ctx.transpose(1, 2).reshape(B, S, H)  # (B, S, H)
        return F.linear(ctx, P["attn_ow"])

    def ffn(t):  # (B, S, H) -> (B, S, H), before the output bias
        act = F.gelu(F.linear(t, P["inter_w"], P["inter_b"]), approximate=gelu_approximate)  # (B, S, I)
        return F.linear(act, P["output_w"])

    if pre_layer_norm:
        a = attention_block(ln(x, P["norm_w"], P["norm_b"]))
        h = x + _dropout(a + P["attn_ob"], hidden_dropout_p, keep_masks.get("attn_out"), "attn_out")
        o = ffn(ln(h, P["attn_nw"], P["attn_nb"]))
        out = h + _dropout(o + P["output_b"], hidden_dropout_p, keep_masks.get("ffn_out"), "ffn_out")
    else:
        a = attention_block(x)
        h = ln(
            x + _dropout(a + P["attn_ob"], hidden_dropout_p, keep_masks.get("attn_out"), "attn_out"),
            P["attn_nw"],
            P["attn_nb"],
        )
        o = ffn(h)
        out = ln(
            h + _dropout(o + P["output_b"], hidden_dropout_p, keep_masks.get("ffn_out"), "ffn_out"),
            P["norm_w"],
            P["norm_b"],
        )
    return out.to(dtype)
