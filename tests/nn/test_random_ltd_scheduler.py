"""`fastlayers.nn.random_ltd_scheduler.RandomLTDScheduler` against DeepSpeed 0.19.6's, step by step."""

from __future__ import annotations

import copy
import re
import warnings

import pytest

ds_scheduler = pytest.importorskip("deepspeed.runtime.data_pipeline.data_routing.scheduler")

from fastlayers.nn.random_ltd_scheduler import RandomLTDScheduler  # noqa: E402
from tests._random_ltd_helpers import make_config  # noqa: E402

DSScheduler = ds_scheduler.RandomLTDScheduler


CONFIGS = {
    "paper": make_config(),
    "min_not_multiple": make_config(total=12, ids=list(range(1, 11)), lo=100, hi=1000, require=37, seq=16, gbs=8),
    "max_not_multiple": make_config(total=8, ids=[1, 2, 3, 5], lo=64, hi=1000, require=50, seq=32, gbs=3),
    "min_eq_max": make_config(total=6, ids=[1, 2, 3, 4], lo=512, hi=512, require=10, seq=16, gbs=3),
    "one_layer_long_ramp": make_config(total=4, ids=[2], lo=16, hi=4096, require=10000, seq=64, gbs=1024),
    "seq_per_step_1": make_config(total=3, ids=[0, 1, 2], lo=7, hi=50, require=13, seq=1, gbs=5),
    "no_ltd_layers": make_config(total=5, ids=[], lo=32, hi=256, require=20, seq=32, gbs=2),
}


def ours(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return RandomLTDScheduler(copy.deepcopy(cfg))


def theirs(cfg):
    return DSScheduler(copy.deepcopy(cfg))


def step_sequence(require):
    """Engine-like global steps: each repeated 1-3 times (gradient accumulation), a few skipped, past require."""
    steps = []
    for t in range(int(require * 1.6) + 5):
        if t % 11 == 7:
            continue
        steps += [t] * (1 + t % 3)
    return steps


def assert_same(a, b):
    assert a.get_current_seq() == b.get_current_seq()
    assert a.state == b.state
    assert a.state_dict() == b.state_dict()


def require_of(cfg):
    return cfg["random_ltd_schedule"]["schedule_config"]["require_steps"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_init_matches_deepspeed(name):
    cfg = CONFIGS[name]
    a, b = ours(cfg), theirs(cfg)
    assert_same(a, b)
    assert a.state["current_value"] == cfg["random_ltd_schedule"]["min_value"]
    assert a.state["consumed_layer_tokens"] == 0 and a.state["current_steps"] == -1
    assert set(a.state) == {
        "min_value",
        "max_value",
        "current_value",
        "schedule_config",
        "schedule_type",
        "consumed_layer_tokens",
        "current_steps",
    }
    for attr in ("model_layer_num", "random_ltd_layer_num", "global_batch_size", "config_schedule"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.get_random_ltd_layer_num() == b.get_random_ltd_layer_num()
    assert a.random_ltd_layer_id == cfg["random_ltd_layer_id"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_seq_matches_deepspeed_every_step(name):
    cfg = CONFIGS[name]
    a, b = ours(cfg), theirs(cfg)
    seen = set()
    for t in step_sequence(min(require_of(cfg), 400)):
        a.update_seq(t)
        b.update_seq(t)
        assert_same(a, b)
        seen.add(a.get_current_seq())
    assert len(seen) >= 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_get_value_matches_deepspeed(name):
    cfg = CONFIGS[name]
    a, b = ours(cfg), theirs(cfg)
    require = require_of(cfg)
    for t in list(range(0, 3 * min(require, 300))) + [require - 1, require, require + 1, 5 * require]:
        assert a.get_value(t) == b.get_value(t), t
        for root in (1, 2, 3.5):
            assert a._fixed_root_get_value(t, root) == b._BaseScheduler__fixed_root_get_value(t, root), (t, root)


def test_quirk_value_below_min_kept():
    a = ours(CONFIGS["min_not_multiple"])
    a.update_seq(0)
    assert a.get_current_seq() == 96  # 100 rounded down to a multiple of 16, as DeepSpeed
    b = ours(CONFIGS["max_not_multiple"])
    b.update_seq(50)  # require_steps reached: 1000 rounded down to 992, not yet frozen
    assert b.get_current_seq() == 992


@pytest.mark.parametrize("name", list(CONFIGS))
def test_get_total_layer_tokens_fresh_and_unmutating(name):
    cfg = CONFIGS[name]
    require = require_of(cfg)
    a = ours(cfg)
    for t in range(min(require, 50) // 2):  # mid-training: the answer must not depend on it
        a.update_seq(t)
    before = copy.deepcopy(a.state)
    for n in (0, 1, 2, 7, require - 1, require, require + 5, 3 * require):
        assert a.get_total_layer_tokens(n) == theirs(cfg).get_total_layer_tokens(n), n
        assert a.state == before
    fresh = ours(cfg)
    fresh.get_total_layer_tokens(require)
    assert_same(fresh, theirs(cfg))


def test_get_total_layer_tokens_bad_arg():
    a = ours(CONFIGS["paper"])
    with pytest.raises(ValueError, match="train_iters must be >= 0, got -1"):
        a.get_total_layer_tokens(-1)
    with pytest.raises(TypeError, match=r"train_iters must be an int, got 2\.0"):
        a.get_total_layer_tokens(2.0)


@pytest.mark.parametrize("name", ["paper", "min_not_multiple", "max_not_multiple", "one_layer_long_ramp"])
def test_state_dict_round_trip(name):
    cfg = CONFIGS[name]
    steps = step_sequence(min(require_of(cfg), 300))
    k = len(steps) // 3
    whole = ours(cfg)
    for t in steps:
        whole.update_seq(t)
    first = ours(cfg)
    for t in steps[:k]:
        first.update_seq(t)
    saved = copy.deepcopy(first.state_dict())
    assert set(saved) == {"consumed_layer_tokens", "current_steps", "current_value", "min_value", "max_value"}
    resumed = ours(cfg)
    resumed.load_state_dict(saved)
    ds_resumed = theirs(cfg)
    ds_resumed.load_state_dict(saved)  # our checkpoint entry loads into DeepSpeed's, and the other way round
    for t in steps[k:]:
        resumed.update_seq(t)
        ds_resumed.update_seq(t)
        assert_same(resumed, ds_resumed)
    assert_same(resumed, whole)

    ds_first = theirs(cfg)
    for t in steps[:k]:
        ds_first.update_seq(t)
    from_ds = ours(cfg)
    from_ds.load_state_dict(ds_first.state_dict())
    assert from_ds.state_dict() == saved


def test_load_state_dict_missing_key():
    a = ours(CONFIGS["paper"])
    a.update_seq(3)
    before = copy.deepcopy(a.state)
    bad = a.state_dict()
    del bad["current_steps"], bad["max_value"]
    with pytest.raises(KeyError, match=r"missing key\(s\) \['current_steps', 'max_value'\]"):
        a.load_state_dict(bad)
    assert a.state == before  # nothing half-loaded


@pytest.mark.parametrize("name", ["paper", "min_not_multiple", "max_not_multiple"])
def test_set_current_seq_reset_get_set_state(name):
    cfg = CONFIGS[name]
    a, b = ours(cfg), theirs(cfg)
    hi = cfg["random_ltd_schedule"]["max_value"]
    for t in range(10):
        a.update_seq(t)
        b.update_seq(t)
    for v in (300, hi, hi + 7):  # below max: recomputed next step; at or above max: frozen
        a.set_current_seq(v)
        b.set_current_seq(v)
        assert_same(a, b)
        for t in (10, 10, 11, 40):
            a.update_seq(t)
            b.update_seq(t)
            assert_same(a, b)
    a.reset_to_init()
    b.reset_to_init()
    assert_same(a, b)
    assert a.state == ours(cfg).state

    live = a.get_state()
    assert live is a.state
    live["current_value"] = 208
    assert a.get_current_seq() == 208
    new_state = copy.deepcopy(b.get_state())
    new_state["current_value"] = 144
    new_state["current_steps"] = 5
    a.set_state(new_state)
    b.set_state(copy.deepcopy(new_state))
    assert a.get_state() is new_state
    for t in (5, 6, 6, 90):
        a.update_seq(t)
        b.update_seq(t)
        assert_same(a, b)


def test_get_value_unsupported_type_after_set_state():
    a = ours(CONFIGS["paper"])
    state = copy.deepcopy(a.state)
    state["schedule_type"] = "fixed_root"
    a.set_state(state)
    with pytest.raises(RuntimeError, match=r"Unsupported random LTD schedule type 'fixed_root'.*'fixed_linear'"):
        a.update_seq(0)


def test_config_is_copied():
    cfg = make_config()
    a = RandomLTDScheduler(cfg)
    cfg["random_ltd_schedule"]["max_value"] = 4096
    cfg["random_ltd_schedule"]["schedule_config"]["seq_per_step"] = 3
    a.reset_to_init()
    assert a.state["max_value"] == 2048 and a.state["schedule_config"]["seq_per_step"] == 16
    assert a.config["global_batch_size"] == 256
    assert "RandomLTDScheduler(total_layer_num=24" in repr(a)


# -- warnings for DeepSpeed's rounding quirks --


def test_warns_min_not_multiple():
    with pytest.warns(UserWarning, match=r"min_value=100 is not a multiple of seq_per_step=16.*is 96"):
        RandomLTDScheduler(CONFIGS["min_not_multiple"])


def test_warns_max_not_multiple():
    with pytest.warns(UserWarning, match=r"max_value=1000 is not a multiple of seq_per_step=32.*at 992"):
        RandomLTDScheduler(CONFIGS["max_not_multiple"])


def test_no_warning_when_aligned_or_constant():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RandomLTDScheduler(CONFIGS["paper"])
        RandomLTDScheduler(make_config(lo=100, hi=100, seq=16))  # min == max: the schedule never runs


# -- input forms --


def full_json(ltd, **top):
    return {
        "train_micro_batch_size_per_gpu": 4,
        **top,
        "data_efficiency": {"enabled": True, "seed": 1234, "data_routing": {"enabled": True, "random_ltd": ltd}},
    }


def test_full_json_uses_train_batch_size():
    ltd = make_config(gbs=64)
    del ltd["global_batch_size"]
    ltd["enabled"] = True
    a = RandomLTDScheduler(full_json(ltd, train_batch_size=64))
    b = ours(make_config(gbs=64))
    assert a.global_batch_size == 64
    for t in step_sequence(50):
        a.update_seq(t)
        b.update_seq(t)
    assert_same(a, b)


def test_full_json_with_global_batch_size():
    a = RandomLTDScheduler(full_json(make_config(gbs=32)))
    assert a.global_batch_size == 32
    a = RandomLTDScheduler(full_json(make_config(gbs=32), train_batch_size=32))
    assert a.global_batch_size == 32


def test_full_json_conflicting_batch_sizes():
    with pytest.raises(ValueError, match=r"'global_batch_size'=32 differs from the top-level 'train_batch_size'=64"):
        RandomLTDScheduler(full_json(make_config(gbs=32), train_batch_size=64))


def test_full_json_without_batch_size():
    ltd = make_config()
    del ltd["global_batch_size"]
    with pytest.raises(ValueError, match=r"missing 'global_batch_size'.*train_batch_size"):
        RandomLTDScheduler(full_json(ltd))


def test_full_json_without_random_ltd():
    cfg = full_json(make_config())
    del cfg["data_efficiency"]["data_routing"]
    with pytest.raises(ValueError, match=r"no 'data_routing' key under data_efficiency"):
        RandomLTDScheduler(cfg)
    cfg = full_json(make_config())
    cfg["data_efficiency"]["data_routing"]["random_ltd"] = [1]
    with pytest.raises(TypeError, match=r"'data_efficiency\.data_routing\.random_ltd' must be a dict, got list"):
        RandomLTDScheduler(cfg)


def test_nested_random_ltd_key():
    a = RandomLTDScheduler({"random_ltd": make_config(gbs=16)})
    assert a.global_batch_size == 16
    ltd = make_config()
    del ltd["global_batch_size"]
    a = RandomLTDScheduler({"train_batch_size": 8, "random_ltd": ltd})
    assert a.global_batch_size == 8
    assert a.state == ours(make_config(gbs=8)).state


def test_config_not_a_dict():
    with pytest.raises(TypeError, match="must be a dict .* got list"):
        RandomLTDScheduler([("total_layer_num", 24)])


def test_layer_token_lr_schedule_optional():
    cfg = make_config()
    del cfg["layer_token_lr_schedule"]
    assert RandomLTDScheduler(cfg).state == ours(make_config()).state


# -- validation --


def _without(path):
    cfg = make_config()
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    del node[last]
    return cfg


@pytest.mark.parametrize(
    "path",
    [
        "total_layer_num",
        "random_ltd_layer_num",
        "random_ltd_layer_id",
        "random_ltd_schedule",
        "random_ltd_schedule.min_value",
        "random_ltd_schedule.max_value",
        "random_ltd_schedule.schedule_type",
        "random_ltd_schedule.schedule_config",
        "random_ltd_schedule.schedule_config.require_steps",
        "random_ltd_schedule.schedule_config.seq_per_step",
    ],
)
def test_missing_key(path):
    with pytest.raises(ValueError, match=rf"missing required key\(s\): '{re.escape(path)}'"):
        RandomLTDScheduler(_without(path))


def test_missing_keys_all_listed():
    cfg = _without("total_layer_num")
    del cfg["random_ltd_schedule"]["schedule_config"]["seq_per_step"]
    with pytest.raises(ValueError, match=r"'total_layer_num', 'random_ltd_schedule\.schedule_config\.seq_per_step'"):
        RandomLTDScheduler(cfg)


def test_missing_global_batch_size():
    with pytest.raises(
        ValueError, match=r"missing 'global_batch_size': add it to the random_ltd dict.*train_batch_size"
    ):
        RandomLTDScheduler(_without("global_batch_size"))


def _sched(**kw):
    sc = {k: kw.pop(k) for k in ("require_steps", "seq_per_step") if k in kw}
    cfg = make_config()
    cfg["random_ltd_schedule"].update(kw)
    cfg["random_ltd_schedule"]["schedule_config"].update(sc)
    return cfg


@pytest.mark.parametrize(
    ("cfg", "exc", "pattern"),
    [
        (make_config(total_layer_num=24.0), TypeError, r"'total_layer_num' must be an int, got 24\.0 \(float\)"),
        (make_config(total=0, ids=[]), ValueError, r"'total_layer_num' must be >= 1, got 0"),
        (make_config(gbs="256"), TypeError, r"'global_batch_size' must be an int, got '256' \(str\)"),
        (make_config(gbs=0), ValueError, r"'global_batch_size' must be >= 1, got 0"),
        (make_config(gbs=True), TypeError, r"'global_batch_size' must be an int, got True \(bool\)"),
        (
            make_config(random_ltd_layer_num=-1),
            ValueError,
            r"'random_ltd_layer_num' must be >= 0, got -1",
        ),
        (
            make_config(random_ltd_layer_num=21),
            ValueError,
            r"'random_ltd_layer_id' has 22 ids .* but 'random_ltd_layer_num'=21",
        ),
        (
            make_config(total=4, ids=[0, 1, 2, 3], random_ltd_layer_num=5),
            ValueError,
            r"'random_ltd_layer_num'=5 is larger than 'total_layer_num'=4",
        ),
        (make_config(total=4, ids=[1, 4]), ValueError, r"ids \[4\] outside \[0, total_layer_num=4\)"),
        (make_config(total=4, ids=[-1, 2]), ValueError, r"ids \[-1\] outside \[0, total_layer_num=4\)"),
        (make_config(total=6, ids=[1, 3, 3, 1]), ValueError, r"duplicated ids \[1, 3\]"),
        (
            make_config(total=4, ids=[1, 2.0]),
            TypeError,
            r"'random_ltd_layer_id' must be a list of ints, got \[1, 2\.0\]",
        ),
        (make_config(random_ltd_layer_id="1,2"), TypeError, r"'random_ltd_layer_id' must be a list of ints"),
        (_sched(min_value=0), ValueError, r"'random_ltd_schedule\.min_value' must be >= 1, got 0"),
        (_sched(min_value=128.0), TypeError, r"'random_ltd_schedule\.min_value' must be an int, got 128\.0"),
        (_sched(max_value=None), TypeError, r"'random_ltd_schedule\.max_value' must be an int, got None"),
        (
            _sched(min_value=4096),
            ValueError,
            r"'random_ltd_schedule\.min_value'=4096 is larger than 'random_ltd_schedule\.max_value'=2048",
        ),
        (
            _sched(require_steps=0),
            ValueError,
            r"'random_ltd_schedule\.schedule_config\.require_steps' must be >= 1, got 0",
        ),
        (
            _sched(seq_per_step=0),
            ValueError,
            r"'random_ltd_schedule\.schedule_config\.seq_per_step' must be >= 1, got 0",
        ),
        (
            _sched(seq_per_step=1.5),
            TypeError,
            r"'random_ltd_schedule\.schedule_config\.seq_per_step' must be an int, got 1\.5",
        ),
        (
            make_config(schedule_type="fixed_root"),
            RuntimeError,
            r"Unsupported random LTD schedule type 'fixed_root': the supported one is 'fixed_linear'",
        ),
        (
            make_config(layer_token_lr_schedule={"enabled": True}),
            NotImplementedError,
            r"'layer_token_lr_schedule\.enabled' is true.*not implemented",
        ),
        (make_config(layer_token_lr_schedule=True), TypeError, r"'layer_token_lr_schedule' must be a dict, got True"),
        (make_config(random_ltd_schedule=[128, 2048]), TypeError, r"'random_ltd_schedule' must be a dict"),
        (
            make_config(model_type="encoder-decoder"),
            ValueError,
            r"'model_type'='encoder-decoder' is not one of \['decoder', 'encoder'\]",
        ),
        (
            make_config(hidden_state_order="bsh"),
            ValueError,
            r"'hidden_state_order'='bsh' is not one of \['seq_batch_dim', 'batch_seq_dim'\]",
        ),
    ],
)
def test_bad_config(cfg, exc, pattern):
    with pytest.raises(exc, match=pattern):
        RandomLTDScheduler(cfg)


def test_bad_schedule_config_type():
    cfg = make_config()
    cfg["random_ltd_schedule"]["schedule_config"] = 16
    with pytest.raises(TypeError, match=r"'random_ltd_schedule\.schedule_config' must be a dict, got 16"):
        RandomLTDScheduler(cfg)


def test_deepspeed_raises_too_for_lr_schedule_and_type():
    """The errors we raise early are ones DeepSpeed raises too (later, or with no message)."""
    with pytest.raises(NotImplementedError):
        DSScheduler(make_config(layer_token_lr_schedule={"enabled": True}))
    ds = DSScheduler(make_config(schedule_type="fixed_root"))
    with pytest.raises(RuntimeError):
        ds.update_seq(0)
