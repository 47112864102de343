"""SparseAttentionUtils + BertSparseSelfAttention on tiny transformers 5.x BERT / RoBERTa models (built from configs,
no downloads)."""

import copy

import pytest
import torch
from torch import nn

from fastlayers.nn.sparse_self_attention import BertSparseSelfAttention
from fastlayers.sparsity_config import DenseSparsityConfig, FixedSparsityConfig

transformers = pytest.importorskip("transformers")

from fastlayers.integrations.sparse_attention_utils import SparseAttentionUtils  # noqa: E402

H, HIDDEN, MAX_POS = 4, 64, 64


def make_model(kind, cls_name="Model", attn="sdpa", max_pos=MAX_POS):
    torch.manual_seed(0)
    common = dict(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=H,
        intermediate_size=96,
        attn_implementation=attn,
    )
    if kind == "bert":
        config = transformers.BertConfig(max_position_embeddings=max_pos, **common)
    else:  # RoBERTa reserves two position rows (padding offset)
        config = transformers.RobertaConfig(max_position_embeddings=max_pos + 2, pad_token_id=1, **common)
    prefix = "Bert" if kind == "bert" else "Roberta"
    return getattr(transformers, prefix + cls_name)(config).eval()


def base(model):
    return getattr(model, "bert", None) or getattr(model, "roberta", None) or model


def inputs(model, B=2, S=37):
    pad = model.config.pad_token_id
    ids = torch.randint(3, 50, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 9 :] = 0
    ids[1, S - 9 :] = pad
    return ids, mask


def run_padded(model, ids, mask, block):
    pad_len, ids, mask, tt, pos, emb = SparseAttentionUtils.pad_to_block_size(
        block,
        ids,
        mask,
        torch.zeros_like(ids),
        None,
        None,
        model.config.pad_token_id,
        base(model).embeddings.word_embeddings,
    )
    assert ids.shape[1] % block == 0
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    first = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return SparseAttentionUtils.unpad_sequence_output(pad_len, first)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "kind,cls_name", [("bert", "Model"), ("roberta", "Model"), ("bert", "ForMaskedLM"), ("roberta", "ForMaskedLM")]
)
def test_dense_layout_matches_the_dense_model(kind, cls_name, attn):
    dense = make_model(kind, cls_name, attn)
    sparse = copy.deepcopy(dense)
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        sparse, MAX_POS, DenseSparsityConfig(num_heads=H)
    )
    layers = base(sparse).encoder.layer
    assert all(isinstance(layer.attention.self, BertSparseSelfAttention) for layer in layers)
    ids, mask = inputs(dense)
    with torch.no_grad():
        out = dense(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        want = out.logits if hasattr(out, "logits") else out.last_hidden_state
        got = run_padded(sparse, ids, mask, block=16)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_sparse_layout_trains_in_a_model():
    model = make_model("bert", "ForMaskedLM")
    ids = torch.randint(3, 50, (2, 64))
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, MAX_POS, FixedSparsityConfig(num_heads=H, num_local_blocks=2)
    )
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, dense_logits, atol=1e-3)  # the layout is sparse
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.weight.grad is not None and torch.isfinite(q.weight.grad).all() and q.weight.grad.abs().sum() > 0


def test_replace_layers_reuses_the_projections():
    model = make_model("bert")
    old = [layer.attention.self for layer in model.encoder.layer]
    SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
        model.config, model.encoder.layer, FixedSparsityConfig(num_heads=H)
    )
    for layer, o in zip(model.encoder.layer, old, strict=True):
        new = layer.attention.self
        assert isinstance(new, BertSparseSelfAttention)
        assert new.query is o.query and new.key is o.key and new.value is o.value


def test_replace_sets_max_positions_and_rejects_other_models():
    bert, roberta = make_model("bert"), make_model("roberta")
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        bert, 48, FixedSparsityConfig(num_heads=H)
    )
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        roberta, 48, FixedSparsityConfig(num_heads=H)
    )
    assert bert.config.max_position_embeddings == 48 and roberta.config.max_position_embeddings == 50
    with pytest.raises(ValueError, match='"bert" & "roberta"'):
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(nn.Linear(2, 2), 48)
    with pytest.raises(ValueError, match=r"num_heads \(2\).*num_attention_heads \(4\)"):
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
            make_model("bert"), 48, FixedSparsityConfig(num_heads=2)
        )
    with pytest.raises(NotImplementedError, match="FixedSparsityConfig"):  # DeepSpeed's default argument
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(make_model("bert"), 48)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_extend_position_embedding(kind):
    model = make_model(kind, "ForMaskedLM")
    emb = base(model).embeddings
    old = emb.position_embeddings.weight.detach().clone()
    reserved = 2 if kind == "roberta" else 0
    new_max = 160  # 2.5x the original 64 positions: a partial tail
    SparseAttentionUtils.extend_position_embedding(model, new_max)
    w = emb.position_embeddings.weight
    assert w.shape == (new_max + reserved, HIDDEN) and emb.position_embeddings.num_embeddings == new_max + reserved
    assert model.config.max_position_embeddings == new_max + reserved
    torch.testing.assert_close(w[:reserved], old[:reserved], atol=0, rtol=0)  # RoBERTa's reserved rows copied
    for i in range(new_max):
        assert torch.equal(w[reserved + i], old[reserved + i % MAX_POS]), i
    assert emb.position_ids.shape == (1, new_max + reserved)
    assert torch.equal(emb.position_ids[0], torch.arange(new_max + reserved))
    assert emb.token_type_ids.shape == (1, new_max + reserved) and not emb.token_type_ids.any()
    assert not [k for k in model.state_dict() if k.endswith(("position_ids", "token_type_ids"))]  # non-persistent
    # then swap in sparse attention and run a sequence longer than the original table, unpadded and padded
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, new_max, FixedSparsityConfig(num_heads=H)
    )
    ids, mask = inputs(model, S=150)
    with torch.no_grad():
        logits = run_padded(model, ids, mask, block=16)
    assert logits.shape == (2, 150, 50) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="160"):
        SparseAttentionUtils.extend_position_embedding(model, 100)


def test_update_tokenizer_model_max_length(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    tok = transformers.BertTokenizer(str(vocab))
    assert SparseAttentionUtils.update_tokenizer_model_max_length(tok, 4096) is tok
    assert tok.model_max_length == 4096 and tok.init_kwargs["model_max_length"] == 4096
    tok.save_pretrained(tmp_path / "saved")
    assert transformers.BertTokenizer.from_pretrained(tmp_path / "saved").model_max_length == 4096


def test_pad_unpad_round_trip():
    word = nn.Embedding(50, 8, padding_idx=0)
    B, S, block = 2, 21, 16
    ids = torch.randint(1, 50, (B, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    tt = torch.randint(0, 2, (B, S))
    pos = torch.arange(5, 5 + S).expand(B, S)
    embeds = torch.randn(B, S, 8)
    pad_len, ids2, mask2, tt2, pos2, embeds2 = SparseAttentionUtils.pad_to_block_size(
        block, ids, mask, tt, pos, embeds, 0, word
    )
    assert pad_len == 11
    assert ids2.shape == mask2.shape == tt2.shape == pos2.shape == (B, 32) and embeds2.shape == (B, 32, 8)
    assert torch.equal(ids2[:, S:], torch.zeros(B, 11, dtype=torch.long))
    assert mask2.dtype == torch.bool and not mask2[:, S:].any() and mask2[:, :S].all()
    assert not tt2[:, S:].any()
    assert torch.equal(pos2, torch.arange(5, 5 + 32).expand(B, 32))  # continuing positions, not the pad id
    torch.testing.assert_close(embeds2[:, S:], word(torch.zeros(B, 11, dtype=torch.long)))
    for before, after in [(ids, ids2), (mask, mask2), (tt, tt2), (pos, pos2), (embeds, embeds2)]:
        assert torch.equal(SparseAttentionUtils.unpad_sequence_output(pad_len, after), before)
    # no mask given: one is created so the padding is masked out
    _, _, mask3, tt3, pos3, _ = SparseAttentionUtils.pad_to_block_size(block, ids, None, None, None, None, 0, None)
    assert torch.equal(mask3, torch.cat([torch.ones(B, S), torch.zeros(B, 11)], 1).long()) and tt3 is None
    assert pos3 is None
    # already a multiple: unchanged
    out = SparseAttentionUtils.pad_to_block_size(block, ids2, mask2, tt2, pos2, embeds2, 0, word)
    assert out[0] == 0 and all(a is b for a, b in zip(out[1:], (ids2, mask2, tt2, pos2, embeds2), strict=True))
    assert SparseAttentionUtils.unpad_sequence_output(0, embeds2) is embeds2
