"""Random-LTD model helpers with DeepSpeed's names (`deepspeed/runtime/data_pipeline/data_routing/helper.py`).

    model = convert_to_random_ltd(model, GPT2Block, config=ds_config)   # wraps every GPT2Block
    scheduler = model.random_ltd_scheduler
    for step, batch in enumerate(loader):
        scheduler.update_seq(step)                                       # DeepSpeed's engine did this
        loss = model(**batch).loss; ...
    torch.save(save_without_random_ltd(model), "plain.pt")              # loads into the unwrapped model

Differences from DeepSpeed (see the shared behaviour notes §3.6 and §6):

- No DeepSpeed engine is needed: `convert_to_random_ltd(model, convert_type, config=...)` builds the
  `RandomLTDScheduler` and initialises the layers itself (`random_ltd_initialize`), and keeps the scheduler as
  `model.random_ltd_scheduler`. Given a DeepSpeed engine and no config it calls the engine's own
  `random_ltd_initialize()`, as DeepSpeed does.
- Layer ids are matched by position: the k-th wrapped layer in `named_modules()` order is model layer k.
  DeepSpeed matched `str(layer_id)` as a substring of the module name, so a digit elsewhere in the path
  (`blocks1.3`, `h.13` for id 1 before `h.1` is popped...) could assign the wrong layers.
- Converting twice does not wrap a wrapper again (the second call only re-initialises the layers).
- `remove_random_ltd_state_dict` drops only the `random_ltd_layer` path component; DeepSpeed removed every
  `.random_ltd_layer` substring, so a parameter named e.g. `random_ltd_layer_scale` was renamed too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from torch import nn

from fastlayers.nn.random_ltd import WRAPPED, RandomLayerTokenDrop
from fastlayers.nn.random_ltd_scheduler import RandomLTDScheduler


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def convert_to_random_ltd(model: nn.Module, convert_type, config: Mapping | None = None) -> nn.Module:
    """Wrap every submodule of type `convert_type` (a class or tuple of classes) of `model` (or `model.module`)
    in a `RandomLayerTokenDrop`, then initialise the layers listed in the config's `random_ltd_layer_id`.

    Args:
        model: the model, or a DeepSpeed engine (its `.module` is converted).
        convert_type: the layer class(es) to wrap, e.g. `GPT2Block` or `BertLayer`.
        config: DeepSpeed's `random_ltd` dict (or the whole DeepSpeed JSON dict), with `global_batch_size`.
            None: `model` must be a DeepSpeed engine, whose `random_ltd_initialize()` is called.

    Returns:
        `model`, converted in place; `model.random_ltd_scheduler` is the scheduler when `config` was given.
    """
    root = _inner(model)
    if config is None and not callable(getattr(model, "random_ltd_initialize", None)):
        raise ValueError(
            "convert_to_random_ltd needs config= (the random_ltd dict) unless model is a DeepSpeed engine "
            "with random_ltd_initialize()"
        )
    names = [
        name
        for name, m in root.named_modules()
        if isinstance(m, convert_type) and not name.endswith(WRAPPED) and not isinstance(m, RandomLayerTokenDrop)
    ]
    wrapped = any(isinstance(m, RandomLayerTokenDrop) for m in root.modules())
    if not names and not wrapped:
        raise ValueError(f"no submodule of type {convert_type} in {type(root).__name__}")
    for name in names:
        if name == "":
            raise ValueError("convert_to_random_ltd wraps submodules; the model itself is of convert_type")
        _set_submodule(root, name, RandomLayerTokenDrop(root.get_submodule(name)))
    if config is None:
        model.random_ltd_initialize()
    else:
        random_ltd_initialize(root, config)
    return model


def random_ltd_initialize(model: nn.Module, config: Mapping, scheduler: RandomLTDScheduler | None = None):
    """Initialise the `RandomLayerTokenDrop` layers of `model` listed in `random_ltd_layer_id` (the k-th wrapper
    in `named_modules()` order is layer k) with one shared scheduler; returns the scheduler, also kept as
    `model.random_ltd_scheduler`. The other wrappers stay transparent (full sequence)."""
    if scheduler is None:
        scheduler = RandomLTDScheduler(config)
    cfg = scheduler.config if isinstance(getattr(scheduler, "config", None), Mapping) else config
    wrappers = [m for m in _inner(model).modules() if isinstance(m, RandomLayerTokenDrop)]
    ids = sorted(cfg["random_ltd_layer_id"])
    bad = [i for i in ids if not 0 <= i < len(wrappers)]
    if bad:
        raise ValueError(
            f"random_ltd_layer_id {bad} out of range: the model has {len(wrappers)} RandomLayerTokenDrop layers"
        )
    if cfg["random_ltd_layer_num"] != len(ids):
        raise ValueError(
            f"random_ltd_layer_num ({cfg['random_ltd_layer_num']}) must equal the number of random_ltd_layer_id "
            f"entries ({len(ids)})"
        )
    for count, i in enumerate(ids):
        wrappers[i].init_config(cfg, scheduler, count)
    _inner(model).random_ltd_scheduler = scheduler
    return scheduler


def save_without_random_ltd(model: nn.Module) -> OrderedDict:
    """The state dict of `model` (or `model.module`) with the wrapper's `random_ltd_layer` component removed, so it
    loads into the unconverted model."""
    return remove_random_ltd_state_dict(_inner(model).state_dict())


def remove_random_ltd_state_dict(state_dict: Mapping) -> OrderedDict:
    """`h.3.random_ltd_layer.attn.w` -> `h.3.attn.w`; other keys unchanged (order kept)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        out[".".join(p for p in key.split(".") if p != WRAPPED)] = value
    return out
