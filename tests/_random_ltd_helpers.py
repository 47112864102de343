"""The DeepSpeed `random_ltd` config dict the Random-LTD tests build (scheduler, wrapper, HF model tests)."""


def make_config(
    *,
    total=24,
    ids=None,
    lo=128,
    hi=2048,
    require=200,
    seq=16,
    gbs=256,
    schedule_type="fixed_linear",
    model_type="decoder",
    order="seq_batch_dim",
    mask_name="attention_mask",
    **extra,
):
    """DeepSpeed's `random_ltd` dict (with the engine-injected batch sizes); `extra` keys are set last."""
    ids = list(range(1, total - 1)) if ids is None else ids
    cfg = {
        "total_layer_num": total,
        "random_ltd_layer_num": len(ids),
        "random_ltd_layer_id": ids,
        "model_mask_name": mask_name,
        "model_type": model_type,
        "hidden_state_order": order,
        "random_ltd_schedule": {
            "min_value": lo,
            "max_value": hi,
            "schedule_type": schedule_type,
            "schedule_config": {"require_steps": require, "seq_per_step": seq},
        },
        "layer_token_lr_schedule": {"enabled": False},
        "global_batch_size": gbs,
        "micro_batch_size": 4,
    }
    cfg.update(extra)
    return cfg
