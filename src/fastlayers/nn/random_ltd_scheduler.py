"""Random-LTD sequence-length scheduler with DeepSpeed's name, config keys, state and numbers (`RandomLTDScheduler`).

Random-LTD (arXiv 2211.11586) runs the middle layers of a transformer on a random subset of the tokens; the number of
kept tokens grows during training from `min_value` to `max_value`. This scheduler owns that number. It is a
clean-room reimplementation of DeepSpeed 0.19.6 `deepspeed.runtime.data_pipeline.data_routing.scheduler.
RandomLTDScheduler`: same constructor argument (DeepSpeed's `random_ltd` config dict), same `state` dict keys, same
public methods and attributes, same values at every step and the same `state_dict()`, so a DeepSpeed checkpoint's
`'random_ltd'` entry loads and training continues with identical numbers. Pure Python (no torch).

Schedule (`schedule_type="fixed_linear"`, the only one DeepSpeed has), for a global step `t`::

    v = floor(t / require_steps * (max_value - min_value) + min_value)
    v = v - v % seq_per_step              # down to a multiple of seq_per_step (absolute, not counted from min_value)
    value = min(v, max_value)

`update_seq(t)` (DeepSpeed's engine calls it on every training forward) sets `current_value = value(t)` while
`current_value < max_value` (once max_value is reached the value is frozen), and the first call for each distinct `t`
adds `global_batch_size * (current_value * random_ltd_layer_num + max_value * (total_layer_num -
random_ltd_layer_num))` to `consumed_layer_tokens` (repeated calls for one step, gradient accumulation, count once).

Differences from DeepSpeed (the numbers are DeepSpeed's; these are the only behavioural changes):
- The config is validated in `__init__`: missing keys are listed by their path; sizes must be ints (not bool);
  `min_value >= 1`, `min_value <= max_value`, `require_steps >= 1`, `seq_per_step >= 1`, `total_layer_num >= 1`,
  `global_batch_size >= 1`, `0 <= random_ltd_layer_num <= total_layer_num`, `len(random_ltd_layer_id) ==
  random_ltd_layer_num`, ids unique and in `[0, total_layer_num)`; `model_type` ("decoder"/"encoder") and
  `hidden_state_order` ("seq_batch_dim"/"batch_seq_dim") are checked when present. ValueError/TypeError name the key
  and the value. DeepSpeed validates nothing and fails later with a bare KeyError/TypeError, or not at all.
- An unsupported `schedule_type` raises RuntimeError (DeepSpeed's type) in `__init__` naming the type and the
  supported one; DeepSpeed accepts it and raises `RuntimeError('Unsupported random LTD schedule type')` at the first
  `update_seq`. `layer_token_lr_schedule.enabled=True` raises NotImplementedError with a message (DeepSpeed: a bare
  NotImplementedError after logging "Work In Progress"). A missing `layer_token_lr_schedule` means disabled, as after
  DeepSpeed's config parser.
- `config` may also be the full DeepSpeed JSON dict (`data_efficiency.data_routing.random_ltd` is used) or a dict
  with `"random_ltd"` at the top. DeepSpeed's engine injects `global_batch_size` (= `train_batch_size`); here it must
  be in the `random_ltd` dict, or, for the two wrapped forms, `train_batch_size` at the top level is used (the
  engine's value; both given and different is a ValueError). `micro_batch_size` and the `enabled` flags are not used.
- `get_total_layer_tokens(train_iters)` does not touch the scheduler's state: it returns what DeepSpeed's returns on
  a freshly built (or `reset_to_init()`) scheduler, i.e. the tokens of steps `0 .. train_iters-1` from the config's
  schedule. DeepSpeed's runs `update_seq` on the live object (it moves `current_value`, `current_steps` and adds to
  `consumed_layer_tokens`, and its result depends on what ran before). Negative `train_iters` is a ValueError (DeepSpeed
  returns the current count). After the value is frozen the remaining steps are added in one multiplication.
- `load_state_dict` raises KeyError naming every missing key (DeepSpeed: KeyError of the first one, after having
  already overwritten some of the state).
- The scheduler keeps copies of the config dicts (`config`, `config_schedule`, `state["schedule_config"]`);
  DeepSpeed keeps references, so mutating the user's dict afterwards changed DeepSpeed's schedule unvalidated.

DeepSpeed quirks kept (they are the contract, checkpoints depend on them):
- When `min_value` is not a multiple of `seq_per_step`, the value after the first `update_seq` is below `min_value`
  (rounded down, e.g. min 100, seq_per_step 16 → 96). When `max_value` is not a multiple of `seq_per_step`, the value
  stays at the multiple below `max_value` past `require_steps` and jumps to `max_value` only once the unrounded line
  reaches the next multiple. `__init__` warns (UserWarning) in both cases.
- `set_state(state)` stores the given dict itself and `get_state()` returns the live dict (no copies).
- `set_current_seq(v)` sets the value unchecked; a value >= `max_value` freezes it.
- `get_value(t)` reads the schedule from `state`, so it follows `set_state`/`load_state_dict`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["RandomLTDScheduler", "SUPPORTED_SCHEDULE_TYPES"]

SUPPORTED_SCHEDULE_TYPES = ("fixed_linear",)
_STATE_DICT_KEYS = ("consumed_layer_tokens", "current_steps", "current_value", "min_value", "max_value")
_MODEL_TYPES = ("decoder", "encoder")
_HIDDEN_STATE_ORDERS = ("seq_batch_dim", "batch_seq_dim")


def _unwrap_config(config: Any) -> dict:
    """The `random_ltd` dict (a shallow copy) out of any of the three accepted forms."""
    if not isinstance(config, Mapping):
        raise TypeError(
            "RandomLTDScheduler config must be a dict (DeepSpeed's 'random_ltd' dict or the full DeepSpeed JSON "
            f"dict), got {type(config).__name__}"
        )
    if "data_efficiency" in config:
        path = ("data_efficiency", "data_routing", "random_ltd")
    elif "random_ltd" in config:
        path = ("random_ltd",)
    else:
        return dict(config)
    node: Any = config
    for depth, key in enumerate(path):
        where = ".".join(path[:depth]) or "the top level of the config"
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"RandomLTDScheduler config: no '{key}' key under {where} (expected {'.'.join(path)})")
        node = node[key]
    if not isinstance(node, Mapping):
        raise TypeError(f"RandomLTDScheduler config: '{'.'.join(path)}' must be a dict, got {type(node).__name__}")
    ltd = dict(node)
    # DeepSpeed's engine sets random_ltd.global_batch_size = train_batch_size; do the same when we can see it.
    tbs = config.get("train_batch_size")
    if tbs is not None:
        gbs = ltd.get("global_batch_size")
        if gbs is not None and gbs != tbs:
            raise ValueError(
                f"RandomLTDScheduler config: random_ltd 'global_batch_size'={gbs!r} differs from the top-level "
                f"'train_batch_size'={tbs!r} (DeepSpeed uses train_batch_size); give one, or equal values"
            )
        ltd["global_batch_size"] = tbs
    return ltd


def _missing(cfg: Mapping, keys: tuple[str, ...], prefix: str = "") -> list[str]:
    return [prefix + k for k in keys if k not in cfg]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"random_ltd config '{name}' must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"random_ltd config '{name}' must be >= {minimum}, got {value}")


def _check_schedule_type(schedule_type: Any) -> None:
    if schedule_type not in SUPPORTED_SCHEDULE_TYPES:
        raise RuntimeError(
            f"Unsupported random LTD schedule type {schedule_type!r}: the supported one is 'fixed_linear' "
            "(random_ltd_schedule.schedule_type)"
        )


def _fixed_root_value(
    global_steps: float, min_value: int, max_value: int, require_steps: int, seq_per_step: int, root_degree: float
) -> int:
    """DeepSpeed's schedule value at `global_steps` (root_degree 1 is `fixed_linear`). Same float operations."""
    progress = (float(global_steps) / require_steps) ** (1.0 / root_degree)
    value = math.floor(progress * (max_value - min_value) + min_value)
    value -= value % seq_per_step
    return min(value, max_value)


class RandomLTDScheduler:
    """Kept-token count for Random-LTD layers over training (DeepSpeed `RandomLTDScheduler`, same numbers and state).

    Args:
        config: DeepSpeed's `random_ltd` dict::

                {"total_layer_num": 24, "random_ltd_layer_num": 22, "random_ltd_layer_id": [1, ..., 22],
                 "model_mask_name": "attention_mask", "model_type": "decoder", "hidden_state_order": "seq_batch_dim",
                 "random_ltd_schedule": {"min_value": 128, "max_value": 2048, "schedule_type": "fixed_linear",
                                         "schedule_config": {"require_steps": 200000, "seq_per_step": 16}},
                 "layer_token_lr_schedule": {"enabled": False},
                 "global_batch_size": 256}

            `global_batch_size` (samples per optimizer step, DeepSpeed's `train_batch_size`) is required; DeepSpeed's
            engine injected it. Also accepted: the full DeepSpeed JSON dict (`data_efficiency.data_routing.
            random_ltd` is used, and the top-level `train_batch_size` fills `global_batch_size`), or a dict with the
            `random_ltd` dict under the key `"random_ltd"`. Only the schedule, the layer counts/ids and the batch size
            are used here; the other keys are for the layer wrapper.

    Attributes (DeepSpeed's): `state` (dict: `min_value`, `max_value`, `current_value`, `schedule_config`,
    `schedule_type`, `consumed_layer_tokens`, `current_steps`), `model_layer_num` (= total_layer_num),
    `random_ltd_layer_num`, `global_batch_size`, `config_schedule` (the `random_ltd_schedule` dict). Ours: `config`
    (the validated `random_ltd` dict, with `global_batch_size`), `random_ltd_layer_id` (a list).

    Raises:
        TypeError / ValueError: a missing or bad config key (the message names it and its value).
        RuntimeError: an unsupported `schedule_type` (DeepSpeed's type).
        NotImplementedError: `layer_token_lr_schedule.enabled` is true (DeepSpeed has no implementation either).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        cfg = _unwrap_config(config)
        self._validate(cfg)
        self.config = copy.deepcopy(cfg)
        self.model_layer_num: int = cfg["total_layer_num"]
        self.random_ltd_layer_num: int = cfg["random_ltd_layer_num"]
        self.random_ltd_layer_id: list[int] = list(cfg["random_ltd_layer_id"])
        self.config_schedule: dict = copy.deepcopy(dict(cfg["random_ltd_schedule"]))
        self.global_batch_size: int = cfg["global_batch_size"]
        self.state: dict[str, Any] = {}
        self.reset_to_init()

    # -- config validation --

    @staticmethod
    def _validate(cfg: dict) -> None:
        missing = _missing(
            cfg, ("total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id", "random_ltd_schedule")
        )
        sched = cfg.get("random_ltd_schedule")
        if isinstance(sched, Mapping):
            missing += _missing(
                sched, ("min_value", "max_value", "schedule_type", "schedule_config"), "random_ltd_schedule."
            )
            sc = sched.get("schedule_config")
            if isinstance(sc, Mapping):
                missing += _missing(sc, ("require_steps", "seq_per_step"), "random_ltd_schedule.schedule_config.")
        if missing:
            raise ValueError(f"random_ltd config is missing required key(s): {', '.join(repr(k) for k in missing)}")
        if "global_batch_size" not in cfg:
            raise ValueError(
                "random_ltd config is missing 'global_batch_size': add it to the random_ltd dict (the global batch "
                "size in samples per optimizer step; DeepSpeed's engine injected its train_batch_size there)"
            )
        if not isinstance(sched, Mapping):
            raise TypeError(f"random_ltd config 'random_ltd_schedule' must be a dict, got {sched!r}")
        sc = sched["schedule_config"]
        if not isinstance(sc, Mapping):
            raise TypeError(f"random_ltd config 'random_ltd_schedule.schedule_config' must be a dict, got {sc!r}")

        lr_sched = cfg.get("layer_token_lr_schedule", {"enabled": False})
        if not isinstance(lr_sched, Mapping):
            raise TypeError(f"random_ltd config 'layer_token_lr_schedule' must be a dict, got {lr_sched!r}")
        if lr_sched.get("enabled", False):
            raise NotImplementedError(
                "random_ltd 'layer_token_lr_schedule.enabled' is true, but the layer-token learning-rate schedule is "
                "not implemented (DeepSpeed marks it work in progress and raises too); set it to false"
            )

        _check_int("total_layer_num", cfg["total_layer_num"], 1)
        _check_int("random_ltd_layer_num", cfg["random_ltd_layer_num"], 0)
        _check_int("global_batch_size", cfg["global_batch_size"], 1)
        total, n_ltd = cfg["total_layer_num"], cfg["random_ltd_layer_num"]
        if n_ltd > total:
            raise ValueError(
                f"random_ltd config 'random_ltd_layer_num'={n_ltd} is larger than 'total_layer_num'={total}"
            )
        ids = cfg["random_ltd_layer_id"]
        if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"random_ltd config 'random_ltd_layer_id' must be a list of ints, got {ids!r}")
        if len(ids) != n_ltd:
            raise ValueError(
                f"random_ltd config 'random_ltd_layer_id' has {len(ids)} ids {list(ids)} but "
                f"'random_ltd_layer_num'={n_ltd}; they must match"
            )
        bad = [i for i in ids if not 0 <= i < total]
        if bad:
            raise ValueError(
                f"random_ltd config 'random_ltd_layer_id' has ids {bad} outside [0, total_layer_num={total})"
            )
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"random_ltd config 'random_ltd_layer_id' has duplicated ids {dup}")

        _check_int("random_ltd_schedule.min_value", sched["min_value"], 1)
        _check_int("random_ltd_schedule.max_value", sched["max_value"], 1)
        _check_int("random_ltd_schedule.schedule_config.require_steps", sc["require_steps"], 1)
        _check_int("random_ltd_schedule.schedule_config.seq_per_step", sc["seq_per_step"], 1)
        lo, hi, step = sched["min_value"], sched["max_value"], sc["seq_per_step"]
        if lo > hi:
            raise ValueError(
                f"random_ltd config 'random_ltd_schedule.min_value'={lo} is larger than "
                f"'random_ltd_schedule.max_value'={hi}"
            )
        _check_schedule_type(sched["schedule_type"])

        for key, allowed in (("model_type", _MODEL_TYPES), ("hidden_state_order", _HIDDEN_STATE_ORDERS)):
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(f"random_ltd config '{key}'={cfg[key]!r} is not one of {list(allowed)}")

        if lo < hi:
            quirks = []
            if lo % step:
                quirks.append(
                    f"min_value={lo} is not a multiple of seq_per_step={step}: the value after update_seq(0) is "
                    f"{lo - lo % step}, below min_value"
                )
            if hi % step:
                quirks.append(
                    f"max_value={hi} is not a multiple of seq_per_step={step}: the value stays at "
                    f"{hi - hi % step} past require_steps until the schedule line reaches {hi - hi % step + step}"
                )
            if quirks:
                warnings.warn(
                    "random_ltd schedule (DeepSpeed's rounding, kept): " + "; ".join(quirks), UserWarning, stacklevel=3
                )

    # -- schedule --

    def get_value(self, global_steps: int) -> int:
        """The schedule's value at `global_steps`, from the schedule in `state` (DeepSpeed `get_value`)."""
        _check_schedule_type(self.state["schedule_type"])
        return self._fixed_root_get_value(global_steps, 1)

    def _fixed_root_get_value(self, global_steps: int, root_degree: float | None = None) -> int:
        """DeepSpeed's `__fixed_root_get_value`: `root_degree=None` reads `schedule_config['root_degree']`."""
        sc = self.state["schedule_config"]
        if root_degree is None:
            root_degree = sc["root_degree"]
        return _fixed_root_value(
            global_steps,
            self.state["min_value"],
            self.state["max_value"],
            sc["require_steps"],
            sc["seq_per_step"],
            root_degree,
        )

    def _step_layer_tokens(self, current_value: int, max_value: int) -> int:
        dropped_layers = self.model_layer_num - self.random_ltd_layer_num
        return self.global_batch_size * (current_value * self.random_ltd_layer_num + max_value * dropped_layers)

    def update_seq(self, global_steps: int) -> None:
        """Advance to `global_steps`: update `current_value` (unless frozen at max) and, once per distinct step, add
        the step's layer tokens to `consumed_layer_tokens` (DeepSpeed `update_seq`)."""
        state = self.state
        if state["current_value"] < state["max_value"]:
            state["current_value"] = self.get_value(global_steps)
        if global_steps != state["current_steps"]:
            state["consumed_layer_tokens"] += self._step_layer_tokens(state["current_value"], state["max_value"])
            state["current_steps"] = global_steps

    def get_total_layer_tokens(self, train_iters: int) -> int:
        """Layer tokens consumed by steps `0 .. train_iters-1` from a fresh scheduler; does not change `state`.

        Equals DeepSpeed's `get_total_layer_tokens(train_iters)` called on a freshly built scheduler.
        """
        if isinstance(train_iters, bool) or not isinstance(train_iters, int):
            raise TypeError(f"train_iters must be an int, got {train_iters!r} ({type(train_iters).__name__})")
        if train_iters < 0:
            raise ValueError(f"train_iters must be >= 0, got {train_iters}")
        sched = self.config_schedule
        lo, hi = sched["min_value"], sched["max_value"]
        sc = sched["schedule_config"]
        value, total = lo, 0
        for step in range(train_iters):
            if value >= hi:  # frozen: every remaining step adds the same amount
                return total + (train_iters - step) * self._step_layer_tokens(value, hi)
            value = _fixed_root_value(step, lo, hi, sc["require_steps"], sc["seq_per_step"], 1)
            total += self._step_layer_tokens(value, hi)
        return total

    # -- state --

    def reset_to_init(self) -> None:
        """Back to the config's schedule at its start: value min_value, no tokens consumed, `current_steps` -1."""
        sched = self.config_schedule
        self.state["min_value"] = sched["min_value"]
        self.state["max_value"] = sched["max_value"]
        self.state["current_value"] = sched["min_value"]
        self.state["schedule_config"] = copy.deepcopy(sched["schedule_config"])
        self.state["schedule_type"] = sched["schedule_type"]
        self.state["consumed_layer_tokens"] = 0
        self.state["current_steps"] = -1

    def get_current_seq(self) -> int:
        """The number of tokens each Random-LTD layer keeps now."""
        return self.state["current_value"]

    def set_current_seq(self, seq_length: int) -> None:
        """Set the kept-token count (unchecked, as DeepSpeed; >= max_value freezes it)."""
        self.state["current_value"] = seq_length

    def get_random_ltd_layer_num(self) -> int:
        return self.random_ltd_layer_num

    def get_state(self) -> dict[str, Any]:
        """The live `state` dict (not a copy)."""
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        """Replace `state` by the given dict itself (not a copy)."""
        self.state = state

    def state_dict(self) -> dict[str, int]:
        """The five checkpointed entries, as DeepSpeed saves them under the checkpoint key `'random_ltd'`."""
        return {key: self.state[key] for key in _STATE_DICT_KEYS}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the five entries of `state_dict()`; KeyError naming every missing key, before changing anything."""
        missing = [key for key in _STATE_DICT_KEYS if key not in state_dict]
        if missing:
            raise KeyError(
                f"RandomLTDScheduler.load_state_dict: missing key(s) {missing} (expected {list(_STATE_DICT_KEYS)})"
            )
        for key in _STATE_DICT_KEYS:
            self.state[key] = state_dict[key]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(total_layer_num={self.model_layer_num}, random_ltd_layer_num="
            f"{self.random_ltd_layer_num}, min_value={self.state['min_value']}, max_value={self.state['max_value']}, "
            f"current_value={self.state['current_value']}, current_steps={self.state['current_steps']})"
        )
