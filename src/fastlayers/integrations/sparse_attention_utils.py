"""`SparseAttentionUtils`: put block-sparse self-attention into HF BERT / RoBERTa models (transformers 5.x).

Same static methods and arguments as DeepSpeed's `sparse_attention_utils.SparseAttentionUtils`. Differences, on
purpose (DeepSpeed bugs fixed):
- `replace_model_self_attention_with_sparse_self_attention` works (DeepSpeed called a method on the model:
  AttributeError for every HF model), and accepts the base models (`BertModel`, `RobertaModel`) as well as the
  task models that hold them as `.bert` / `.roberta`.
- `extend_position_embedding` fills every new row: the old rows are repeated cyclically up to `max_position`
  (DeepSpeed repeated them `max_position // original` times, leaving a shorter table when `max_position` is not a
  multiple), RoBERTa's two reserved rows 0..1 are copied (DeepSpeed left them, and any tail, uninitialised), and
  the embeddings' `position_ids` / `token_type_ids` buffers (size `max_position_embeddings` in transformers 5.x)
  are extended too.
- `pad_to_block_size` pads `position_ids` with continuing positions (DeepSpeed padded them with the pad token id),
  and creates the attention mask when none is given (the padding must be masked out).
transformers is imported inside the functions only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastlayers.nn.sparse_self_attention import BertSparseSelfAttention
from fastlayers.sparsity_config import SparsityConfig

logger = logging.getLogger(__name__)

_SUPPORTED = 'only supports "bert" & "roberta" models (a BertModel / RobertaModel, or a model with .bert / .roberta)'


def _base_model(model: nn.Module) -> tuple[str, nn.Module]:
    """('bert' | 'roberta', the base model holding `.embeddings` and `.encoder`)."""
    for kind in ("bert", "roberta"):
        base = getattr(model, kind, None)
        if isinstance(base, nn.Module):
            return kind, base
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("bert", "roberta") and hasattr(model, "embeddings") and hasattr(model, "encoder"):
        return model_type, model
    raise ValueError(f"{type(model).__name__}: SparseAttentionUtils {_SUPPORTED}")


class SparseAttentionUtils:
    """Helpers to use block-sparse self-attention in pre-trained BERT/RoBERTa models (static methods)."""

    @staticmethod
    def extend_position_embedding(model: nn.Module, max_position: int) -> nn.Module:
        """Grow the position embeddings to `max_position` positions by repeating the trained ones.

        BERT: rows `0..original-1` are repeated cyclically to `max_position` rows. RoBERTa (two reserved rows for the
        padding offset): rows 0..1 are kept and rows `2..` are repeated cyclically to `max_position + 2` rows. The
        embeddings' `position_ids` / `token_type_ids` buffers and `config.max_position_embeddings` (`max_position`,
        RoBERTa `max_position + 2`) follow. Modifies and returns `model`.
        """
        kind, base = _base_model(model)
        emb = base.embeddings.position_embeddings
        old = emb.weight.data
        reserved = 2 if kind == "roberta" else 0
        original = old.shape[0] - reserved
        if max_position <= original:
            raise ValueError(
                f"max_position ({max_position}) must be larger than the model's current number of positions "
                f"({original})"
            )
        rows = torch.arange(max_position, device=old.device) % original + reserved
        new = torch.cat([old[:reserved], old[rows]], dim=0)  # (max_position + reserved, E)
        emb.weight.data = new
        emb.num_embeddings = new.shape[0]
        SparseAttentionUtils._extend_embedding_buffers(base.embeddings, new.shape[0])
        model.config.max_position_embeddings = new.shape[0]
        if base.config is not model.config:
            base.config.max_position_embeddings = new.shape[0]
        logger.info("extended %s position embeddings from %d to %d rows", kind, old.shape[0], new.shape[0])
        return model

    @staticmethod
    def _extend_embedding_buffers(embeddings: nn.Module, size: int) -> None:
        # transformers 5.x: position_ids = arange(max_position_embeddings)[None], token_type_ids = zeros like it.
        pos = getattr(embeddings, "position_ids", None)
        if isinstance(pos, torch.Tensor) and pos.shape[-1] < size:
            new_pos = torch.arange(size, dtype=pos.dtype, device=pos.device).expand(1, -1)
            embeddings.position_ids = new_pos  # keeps the buffer's registration (non-persistent)
        tt = getattr(embeddings, "token_type_ids", None)
        if isinstance(tt, torch.Tensor) and tt.shape[-1] < size:
            # the buffer is all zeros in HF; continue its last value for the new positions
            tail = tt[..., -1:].expand(*tt.shape[:-1], size - tt.shape[-1])
            embeddings.token_type_ids = torch.cat([tt, tail], dim=-1)

    @staticmethod
    def update_tokenizer_model_max_length(tokenizer, max_position: int):
        """Set `tokenizer.model_max_length` (and its `init_kwargs`, so it is saved) to `max_position`."""
        tokenizer.model_max_length = max_position
        tokenizer.init_kwargs["model_max_length"] = max_position
        logger.info("tokenizer model_max_length set to %d", max_position)
        return tokenizer

    @staticmethod
    def replace_model_self_attention_with_sparse_self_attention(
        model: nn.Module, max_position: int, sparsity_config: SparsityConfig = SparsityConfig(num_heads=4)
    ) -> nn.Module:
        """Swap every layer's self-attention of a BERT/RoBERTa model for `BertSparseSelfAttention`.

        Sets `config.max_position_embeddings` to `max_position` (RoBERTa: `max_position + 2`), as DeepSpeed does
        (extend the embeddings with `extend_position_embedding` first when growing them). The query/key/value
        Linear modules are reused. `sparsity_config` must be a concrete pattern with the model's number of heads.
        Returns `model`.
        """
        kind, base = _base_model(model)
        config = model.config
        config.max_position_embeddings = max_position + (2 if kind == "roberta" else 0)
        SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
            config, base.encoder.layer, sparsity_config
        )
        return model

    @staticmethod
    def replace_self_attention_layer_with_sparse_self_attention_layer(
        config, layers, sparsity_config: SparsityConfig = SparsityConfig(num_heads=4)
    ):
        """For each layer, `layer.attention.self = BertSparseSelfAttention(config, sparsity_config)` reusing the
        layer's `query`/`key`/`value` Linear modules (same device and dtype). Returns `layers`."""
        for layer in layers:
            old = layer.attention.self
            new = BertSparseSelfAttention(config, sparsity_config)
            new.query, new.key, new.value = old.query, old.key, old.value
            new.to(device=old.query.weight.device)
            new.train(old.training)
            layer.attention.self = new
        return layers

    @staticmethod
    def pad_to_block_size(
        block_size: int,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pad_token_id: int,
        model_embeddings: nn.Module | None,
    ):
        """Pad the model inputs on the right so that the sequence length is a multiple of `block_size`.

        input_ids get `pad_token_id`; attention_mask gets 0 (created as ones + zeros when None, so the padding is
        masked); token_type_ids get 0; position_ids continue (`last + 1, last + 2, ...`); inputs_embeds get
        `model_embeddings(pad_token_id)` (the word-embedding module). None inputs other than the mask stay None.

        Returns:
            `(pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)`; undo on the output
            with `unpad_sequence_output(pad_len, sequence_output)`.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pad_to_block_size needs input_ids or inputs_embeds")
        B, S = ref.shape[:2]
        pad_len = (block_size - S % block_size) % block_size
        if pad_len == 0:
            return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
        logger.debug("padding sequence length %d to %d (multiple of %d)", S, S + pad_len, block_size)
        if inputs_embeds is not None:
            if model_embeddings is None:
                raise ValueError("pad_to_block_size needs model_embeddings to pad inputs_embeds")
            pad_ids = torch.full((B, pad_len), pad_token_id, dtype=torch.long, device=inputs_embeds.device)
            pad_embeds = model_embeddings(pad_ids).to(inputs_embeds.dtype)
            inputs_embeds = torch.cat([inputs_embeds, pad_embeds], dim=1)
        if input_ids is not None:
            input_ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], pad_len), pad_token_id)], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones((B, S), dtype=torch.long, device=ref.device)
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_zeros((attention_mask.shape[0], pad_len))], dim=1
        )
        if token_type_ids is not None:
            token_type_ids = torch.cat(
                [token_type_ids, token_type_ids.new_zeros((token_type_ids.shape[0], pad_len))], dim=1
            )
        if position_ids is not None:
            step = torch.arange(1, pad_len + 1, dtype=position_ids.dtype, device=position_ids.device)
            tail = position_ids[..., -1:] + step  # (..., pad_len)
            position_ids = torch.cat([position_ids, tail], dim=-1)
        return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

    @staticmethod
    def unpad_sequence_output(pad_len: int, sequence_output: torch.Tensor) -> torch.Tensor:
        """Drop the last `pad_len` positions (dim 1) that `pad_to_block_size` added."""
        if pad_len > 0:
            sequence_output = sequence_output[:, :-pad_len]
        return sequence_output
