"""Random-LTD layer wrapper: `RandomLayerTokenDrop`, DeepSpeed's name and behaviour (arXiv 2211.11586).

In training, a wrapped layer runs on a random subset of `reserved_length` tokens of each sequence (the
scheduler's current value); the other tokens skip the layer (identity). Gather and scatter are
`GatherTokens` / `ScatterTokens` (fastlayers.functional), whose pairing gives the exact gradient. In eval, with
no scheduler, or when the scheduler keeps every token, the layer runs on the full sequence.

The first LTD layer (index 0) draws the kept tokens of *all* LTD layers in one `torch.multinomial` call, as
DeepSpeed does, and stores them in the scheduler's `state['sample_idx']` / `state['attention_mask']`, so a
seed gives DeepSpeed's tokens; the other layers read them from there.

Differences from DeepSpeed (each a known DeepSpeed limit; see the shared behaviour notes §3.3 and §6):

- Positional arguments after `hidden_states` are accepted and passed through. The mask (`model_mask_name`) is
  found among them through the wrapped layer's signature, so HF layers that take the mask positionally
  (transformers 5.x `GPT2Block`, `BertLayer`) work; DeepSpeed's wrapper took keyword arguments only.
- A layer with index > 0 that finds no draw for the current shape (index 0 did not run first, or ran on a
  different shape) draws for every LTD layer itself instead of failing or reusing stale indices.
- Masks are gathered at the kept rows and columns for both model types when a mask is given (one gather per
  layer). For a pure causal mask this equals DeepSpeed's leading (R, R) square exactly (kept tokens are
  sorted); unlike the square, it is also right for a causal mask that carries padding. A (B, 1, 1, S)
  key-padding mask is accepted, and an encoder without a mask (`None`, e.g. HF SDPA without padding) keeps
  `None`. Every LTD layer of a decoder gets its own mask; DeepSpeed shared one.
- `position_ids` (B or 1, S) and `position_embeddings` (a tuple of (B or 1, S, d) tensors, e.g. rotary cos/sin)
  keyword arguments are gathered at the kept tokens, so rotary-embedding layers see each kept token's own
  position (DeepSpeed passed them through at full length, which fails or is wrong).
- Outputs may be a Tensor, a tuple or a list (first element = hidden states); anything else, or a first
  element whose shape is not the gathered input's, raises TypeError / ValueError naming it (DeepSpeed:
  NotImplementedError after a log line).
- A bad `hidden_state_order` or `model_type` in `init_config` is a ValueError naming the value.
- A state dict saved without the wrapper (a plain model's, or `save_without_random_ltd`'s) loads into a wrapped
  model: keys without the `random_ltd_layer.` component are mapped onto the wrapped layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from fastlayers.functional.random_ltd import GatherTokens, ScatterTokens, bert_sample_tokens, gpt_sample_tokens

HIDDEN_STATE_ORDERS = ("batch_seq_dim", "seq_batch_dim")
MODEL_TYPES = ("encoder", "decoder")
# state keys DeepSpeed's scheduler carries the draw under (deepspeed/runtime/data_pipeline/constants.py)
SAMPLE_INDEX = "sample_idx"
ATTENTION_MASK = "attention_mask"
WRAPPED = "random_ltd_layer"


def _positional_names(layer: nn.Module) -> list[str]:
    """Names of the wrapped layer's positional parameters after the first (hidden_states)."""
    try:
        params = list(inspect.signature(layer.forward).parameters.values())
    except (TypeError, ValueError):  # builtins / C extensions: no signature, masks must be keywords
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds][1:]


class RandomLayerTokenDrop(nn.Module):
    """Wraps `layer` (stored as `self.random_ltd_layer`, so state-dict keys gain `.random_ltd_layer`).

    Call `init_config(config, scheduler, random_ltd_layer_id)` to enable token dropping (the helpers in
    `fastlayers.integrations.random_ltd` do it for a whole model). Until then the wrapper is transparent.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise TypeError(f"RandomLayerTokenDrop wraps an nn.Module, got {type(layer).__name__}")
        self.random_ltd_layer = layer
        self.random_ltd_scheduler = None
        self.random_ltd_layer_id: int | None = None
        self.max_length: int | None = None
        self.reserved_length = -1
        self.curr_seq = -1
        self.curr_micro_batch = -1
        self.batch_first = False
        self.mask_name: str | None = None
        self.micro_bs = None
        self.random_ltd_num_layer: int | None = None
        self.model_type: str | None = None
        self._arg_names = _positional_names(layer)
        self._register_load_state_dict_pre_hook(self._accept_unwrapped_keys)

    def init_config(self, config: Mapping, scheduler, random_ltd_layer_id: int) -> None:
        """Enable token dropping: `config` is DeepSpeed's `random_ltd` dict (`model_mask_name`, `model_type`,
        `hidden_state_order`, optional `micro_batch_size`), `scheduler` a `RandomLTDScheduler` (anything with
        `get_current_seq()`, `state` and `random_ltd_layer_num`), `random_ltd_layer_id` this layer's index among
        the LTD layers (0 draws the tokens of all of them)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be the random_ltd dict, got {type(config).__name__}")
        for key in ("model_type", "hidden_state_order"):
            if key not in config:
                raise KeyError(f"random_ltd config is missing '{key}'")
        order, model_type = config["hidden_state_order"], config["model_type"]
        if order not in HIDDEN_STATE_ORDERS:
            raise ValueError(f"hidden_state_order must be one of {HIDDEN_STATE_ORDERS}, got {order!r}")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        num = scheduler.random_ltd_layer_num
        if isinstance(random_ltd_layer_id, bool) or not isinstance(random_ltd_layer_id, int):
            raise TypeError(f"random_ltd_layer_id must be an int, got {random_ltd_layer_id!r}")
        if not 0 <= random_ltd_layer_id < num:
            raise ValueError(
                f"random_ltd_layer_id must be in [0, {num}) (random_ltd_layer_num), got {random_ltd_layer_id}"
            )
        mask_name = config.get("model_mask_name")
        if mask_name is not None and not isinstance(mask_name, str):
            raise TypeError(f"model_mask_name must be a str or None, got {mask_name!r}")
        self.random_ltd_scheduler = scheduler
        self.random_ltd_layer_id = random_ltd_layer_id
        self.max_length = scheduler.state["max_value"]
        self.mask_name = mask_name
        self.micro_bs = config.get("micro_batch_size")
        self.random_ltd_num_layer = num
        self.model_type = model_type
        self.batch_first = order == "batch_seq_dim"

    def extra_repr(self) -> str:
        if self.random_ltd_scheduler is None:
            return "random_ltd=off"
        order = "batch_seq_dim" if self.batch_first else "seq_batch_dim"
        return f"random_ltd_layer_id={self.random_ltd_layer_id}, model_type={self.model_type}, {order}"

    # -- forward --

    def forward(self, hidden_states, *args, **kwargs):
        if self.random_ltd_scheduler is not None:
            if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
                shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else hidden_states
                raise ValueError(f"RandomLayerTokenDrop expects 3-D hidden_states, got {shape}")
            self.reserved_length = int(self.random_ltd_scheduler.get_current_seq())
            s_dim, b_dim = (1, 0) if self.batch_first else (0, 1)
            self.curr_seq, self.curr_micro_batch = hidden_states.shape[s_dim], hidden_states.shape[b_dim]
        if not (self.training and self.random_ltd_scheduler is not None and self.reserved_length < self.curr_seq):
            return self.random_ltd_layer(hidden_states, *args, **kwargs)

        args = list(args)
        mask, where = self._find_mask(args, kwargs)
        indices, masks = self._draw(hidden_states, mask)
        idx = indices[self.random_ltd_layer_id]  # (B, R) int32, sorted
        hidden_states, part = GatherTokens.apply(hidden_states, idx, self.batch_first)
        if where is not None:
            part_mask = masks[self.random_ltd_layer_id]
            if isinstance(where, int):
                args[where] = part_mask
            else:
                kwargs[where] = part_mask
        self._gather_positions(kwargs, idx)
        outputs = self.random_ltd_layer(part, *args, **kwargs)
        out = outputs[0] if isinstance(outputs, tuple | list) and len(outputs) else outputs
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                "RandomLayerTokenDrop supports layers returning a Tensor or a tuple/list whose first element is "
                f"the hidden states; got {type(outputs).__name__}"
            )
        if out.shape != part.shape:
            raise ValueError(
                f"the wrapped layer returned hidden states of shape {tuple(out.shape)} for an input of shape "
                f"{tuple(part.shape)}: Random-LTD needs a layer that keeps its input shape"
            )
        merged = ScatterTokens.apply(hidden_states, out, idx, self.batch_first)
        if isinstance(outputs, torch.Tensor):
            return merged
        return type(outputs)([merged, *outputs[1:]])

    def _find_mask(self, args: list, kwargs: dict):
        """(mask, where): where is the kwargs key or the args index holding the mask, or None."""
        name = self.mask_name
        if name is None:
            return None, None
        if name in kwargs:
            return kwargs[name], name
        if name in self._arg_names and self._arg_names.index(name) < len(args):
            i = self._arg_names.index(name)
            return args[i], i
        return None, None  # not passed: the layer's default (no mask)

    def _draw(self, hidden_states: torch.Tensor, mask):
        """The (L, B, R) kept indices and per-layer masks (or None) of the current forward: drawn by layer 0,
        or by any layer that finds no draw for this shape."""
        state = self.random_ltd_scheduler.state
        L, B, R, S = self.random_ltd_num_layer, self.curr_micro_batch, self.reserved_length, self.curr_seq
        indices = state.get(SAMPLE_INDEX)
        fresh = (
            self.random_ltd_layer_id != 0
            and isinstance(indices, torch.Tensor)
            and tuple(indices.shape) == (L, B, R)
            and indices.device == hidden_states.device
            and isinstance(state.get(ATTENTION_MASK), list)
            and (mask is None) == (state[ATTENTION_MASK][0] is None)
            and int(state.get("_ltd_seq_length", -1)) == S
        )
        if fresh:
            return indices, state[ATTENTION_MASK]
        if mask is None:
            indices, _ = gpt_sample_tokens(R, S, B, L, hidden_states.device)
            masks = [None] * L
        else:
            if mask.dim() == 2:  # (B, S) key padding, HF-style 0/1: gathered as (B, 1, 1, S) then squeezed
                indices, masks = bert_sample_tokens(R, S, B, L, hidden_states.device, mask[:, None, None, :])
                masks = [m[:, 0, 0, :] for m in masks]
            else:
                indices, masks = bert_sample_tokens(R, S, B, L, hidden_states.device, mask)
        state[SAMPLE_INDEX], state[ATTENTION_MASK], state["_ltd_seq_length"] = indices, masks, S
        return indices, masks

    @staticmethod
    def _gather_positions(kwargs: dict, idx: torch.Tensor) -> None:
        """Gather `position_ids` (B|1, S) and `position_embeddings` ((B|1, S, d), ...) at the kept tokens."""
        B, R = idx.shape
        index = idx.long()
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 2:
            kwargs["position_ids"] = pos.expand(B, pos.shape[1]).gather(1, index.to(pos.device))
        emb = kwargs.get("position_embeddings")
        if isinstance(emb, tuple | list) and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in emb):
            kwargs["position_embeddings"] = type(emb)(
                t.expand(B, *t.shape[1:]).gather(1, index.to(t.device)[:, :, None].expand(B, R, t.shape[2]))
                for t in emb
            )

    # -- checkpoints --

    @staticmethod
    def _accept_unwrapped_keys(state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Map `prefix + key` (a checkpoint of the unwrapped layer) onto `prefix + 'random_ltd_layer.' + key`."""
        inner = prefix + WRAPPED + "."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
