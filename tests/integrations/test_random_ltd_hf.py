"""Random-LTD on transformers 5.x models built from configs (random weights, nothing downloaded): GPT-2 (decoder,
causal mask passed positionally) and BERT (encoder, padding mask passed positionally).

Checked: conversion wraps the right layers; eval and full-length training equal the unconverted model; a training
step equals the unconverted model run with gather -> block -> scatter hooks at the tokens the wrapper drew
(forward and every gradient); state dicts move between converted and plain models both ways."""

import copy

import pytest
import torch

from fastlayers.integrations.random_ltd import (
    convert_to_random_ltd,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
)
from fastlayers.nn.random_ltd import RandomLayerTokenDrop
from tests._random_ltd_helpers import make_config
from tests.tolerances import assert_close

transformers = pytest.importorskip("transformers")


def ltd_dict(model_type, total, ids, lo, hi):
    """Layers `ids` of `total` keep `lo` tokens at step 0 (batch-first HF hidden states)."""
    return make_config(
        total=total, ids=ids, lo=lo, hi=hi, require=4, seq=2, gbs=2, model_type=model_type, order="batch_seq_dim"
    )


def gpt2(attn="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        bos_token_id=0,
        eos_token_id=0,
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def bert(attn="sdpa"):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False)


def gather_hooks(blocks, indices, mask_pos):
    """Hooks on plain blocks: gather hidden states and the (B, 1, S|1, S) mask (positional `mask_pos`) at `indices[k]`
    (index_select per sequence), run, scatter back with index_copy. Returns the hook handles."""
    handles = []
    for k, block in enumerate(blocks):
        idx = indices[k].long()  # (B, R)
        saved = {}

        def pre(mod, args, kwargs, idx=idx, saved=saved):
            h, rest = args[0], list(args)
            saved["full"] = h
            rest[0] = torch.stack([h[b].index_select(0, idx[b]) for b in range(h.shape[0])])
            m = rest[mask_pos] if len(rest) > mask_pos else None
            if isinstance(m, torch.Tensor) and m.dim() == 4:
                rows = []
                for b in range(h.shape[0]):
                    mb = m[b if m.shape[0] > 1 else 0 : (b if m.shape[0] > 1 else 0) + 1].index_select(3, idx[b])
                    rows.append(mb.index_select(2, idx[b]) if mb.shape[2] != 1 else mb)
                rest[mask_pos] = torch.cat(rows)
            if "position_ids" in kwargs and kwargs["position_ids"] is not None:
                p = kwargs["position_ids"].expand(h.shape[0], -1)
                kwargs = dict(kwargs, position_ids=torch.gather(p, 1, idx))
            return tuple(rest), kwargs

        def post(mod, args, kwargs, out, idx=idx, saved=saved):
            y = out[0] if isinstance(out, tuple) else out
            full = saved["full"]
            merged = torch.stack([full[b].index_copy(0, idx[b], y[b]) for b in range(full.shape[0])])
            return (merged, *out[1:]) if isinstance(out, tuple) else merged

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    return handles


def _check_step(model, plain, blocks_of, mask_pos, inputs, ids, sched, loss_of):
    model.train()
    plain.train()
    out = loss_of(model(**inputs))
    idx = sched.state["sample_idx"]
    handles = gather_hooks([blocks_of(plain)[i] for i in ids], idx, mask_pos)
    try:
        ref = loss_of(plain(**inputs))
    finally:
        for h in handles:
            h.remove()
    assert_close(out, ref, torch.float32)
    out.backward()
    ref.backward()
    got = dict(remove_random_ltd_state_dict({n: p.grad for n, p in model.named_parameters()}))
    for n, p in plain.named_parameters():
        assert got[n] is not None, n
        assert_close(got[n], p.grad, torch.float32, "bwd", name=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_train_step_matches_hooked_plain_model(attn):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    plain = gpt2(attn)
    model = copy.deepcopy(plain)
    ids = [1, 2]
    convert_to_random_ltd(model, GPT2Block, config=ltd_dict("decoder", 4, ids, 6, 16))
    sched = model.random_ltd_scheduler
    wrappers = [m for m in model.modules() if isinstance(m, RandomLayerTokenDrop)]
    assert len(wrappers) == 4 and [w.random_ltd_scheduler is not None for w in wrappers] == [False, True, True, False]
    tokens = torch.randint(0, 97, (2, 16))
    attn_mask = torch.ones(2, 16, dtype=torch.long)
    attn_mask[1, 11:] = 0  # padding: the causal mask carries it (4-D), gathered at kept rows and columns
    for mask in (None, attn_mask):
        inputs = {"input_ids": tokens, "attention_mask": mask} if mask is not None else {"input_ids": tokens}
        sched.set_current_seq(6)
        model.zero_grad()
        plain.zero_grad()
        inputs = dict(inputs, labels=tokens)
        _check_step(model, plain, lambda m: m.transformer.h, 2, inputs, ids, sched, lambda o: o.loss)
    # eval, and training at full length: exactly the plain model
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, plain(tokens).logits)
    model.train()
    sched.set_current_seq(16)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, plain.train()(tokens).logits)


def test_bert_train_step_matches_hooked_plain_model():
    from transformers.models.bert.modeling_bert import BertLayer

    plain = bert()
    model = copy.deepcopy(plain)
    ids = [1, 2]
    convert_to_random_ltd(model, BertLayer, config=ltd_dict("encoder", 4, ids, 4, 14))
    sched = model.random_ltd_scheduler
    tokens = torch.randint(0, 97, (2, 14))
    attn_mask = torch.ones(2, 14, dtype=torch.long)
    attn_mask[0, 9:] = 0
    sched.set_current_seq(8)
    inputs = {"input_ids": tokens, "attention_mask": attn_mask}
    w = torch.randn(2, 14, 32)
    _check_step(
        model, plain, lambda m: m.encoder.layer, 1, inputs, ids, sched, lambda o: (o.last_hidden_state * w).sum()
    )


def test_state_dicts_move_both_ways():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    plain = gpt2()
    model = copy.deepcopy(plain)
    convert_to_random_ltd(model, GPT2Block, config=ltd_dict("decoder", 4, [1, 2], 6, 16))
    assert any(".random_ltd_layer." in k for k in model.state_dict())
    stripped = save_without_random_ltd(model)
    assert list(stripped) == list(plain.state_dict())
    fresh = gpt2()
    torch.manual_seed(1)
    for p in fresh.parameters():
        p.data.normal_()
    fresh.load_state_dict(stripped)  # strict: every key matches the plain model
    converted = copy.deepcopy(fresh)
    convert_to_random_ltd(converted, GPT2Block, config=ltd_dict("decoder", 4, [1, 2], 6, 16))
    converted.load_state_dict(plain.state_dict())  # a plain checkpoint loads into the converted model
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(converted.eval()(tokens).logits, plain.eval()(tokens).logits)


def test_remove_state_dict_matches_deepspeed_on_plain_names():
    helper = pytest.importorskip("deepspeed.runtime.data_pipeline.data_routing.helper")
    sd = {"h.0.random_ltd_layer.attn.w": 1, "h.1.mlp.b": 2, "wte.weight": 3}
    assert remove_random_ltd_state_dict(sd) == helper.remove_random_ltd_state_dict(sd)
    # DeepSpeed also renamed a parameter whose name merely starts with the wrapper's attribute name
    odd = {"h.0.random_ltd_layer.random_ltd_layer_scale": 1}
    assert list(remove_random_ltd_state_dict(odd)) == ["h.0.random_ltd_layer_scale"]
    assert list(helper.remove_random_ltd_state_dict(odd)) == ["h.0_scale"]


def test_convert_errors_and_idempotence():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    model = gpt2()
    with pytest.raises(ValueError, match="needs config="):
        convert_to_random_ltd(model, GPT2Block)
    with pytest.raises(ValueError, match="out of range.*4 RandomLayerTokenDrop"):
        convert_to_random_ltd(copy.deepcopy(model), GPT2Block, config=ltd_dict("decoder", 6, [1, 5], 6, 16))
    convert_to_random_ltd(model, GPT2Block, config=ltd_dict("decoder", 4, [1, 2], 6, 16))
    convert_to_random_ltd(model, GPT2Block, config=ltd_dict("decoder", 4, [1, 2], 6, 16))  # no double wrap
    assert sum(isinstance(m, RandomLayerTokenDrop) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="no submodule of type"):
        convert_to_random_ltd(gpt2(), torch.nn.Conv3d, config=ltd_dict("decoder", 4, [1, 2], 6, 16))
