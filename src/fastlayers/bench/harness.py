"""Benchmark harness: interleaved timing of ours and the peer, medians, ratios, memory fields.

The machine is noisy, so each case runs `rounds` rounds; in each round ours and the peer are timed
back to back (order alternating by round), `reps` calls each, and the per-round medians are kept.
The reported time is the median over rounds. `ratio = ours_ms / peer_ms` (below 1 is faster) and
`speedup = peer_ms / ours_ms`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Case:
    """One benchmark case: two zero-argument callables timed side by side."""

    name: str
    ours: Callable[[], Any]
    peer: Callable[[], Any]
    peer_name: str
    flops: float | None = None  # FLOPs of one call, for a GFLOP/s column
    # memory fields etc., copied into the record after timing (setup may fill them); a `work_limit`
    # (ideal speedup from the work kept) adds `speedup_vs_limit` = measured speedup / work_limit
    extra: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[], None] | None = None  # called once before timing (e.g. to build big inputs lazily)
    teardown: Callable[[], None] | None = None


@dataclass
class Record:
    name: str
    ours_ms: float
    peer_ms: float
    ratio: float
    speedup: float
    peer: str
    ours_range_ms: tuple[float, float]
    peer_range_ms: tuple[float, float]
    gflops: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], Any], reps: int, device_type: str) -> float:
    times = []
    for _ in range(reps):
        _sync(device_type)
        t0 = time.perf_counter()
        fn()
        _sync(device_type)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(
    cases: list[Case],
    *,
    rounds: int = 3,
    reps: int = 3,
    warmup: int = 1,
    progress: bool = True,
    device_type: str = "cpu",
) -> list[Record]:
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases) * rounds, desc="bench", unit="round", leave=False)
        except ImportError:
            bar = None
    records = []
    for case in cases:
        if case.setup is not None:
            case.setup()
        for _ in range(warmup):
            case.ours()
            case.peer()
        ours_r, peer_r = [], []
        for r in range(rounds):
            pair = [(case.ours, ours_r), (case.peer, peer_r)]
            for fn, acc in pair if r % 2 == 0 else reversed(pair):
                acc.append(_time_once(fn, reps, device_type))
            if bar is not None:
                bar.update(1)
        o, p = statistics.median(ours_r), statistics.median(peer_r)
        extra = dict(case.extra)
        if extra.get("work_limit"):  # how close to the ideal speedup (time proportional to the work kept)
            extra["speedup_vs_limit"] = round(p / o / extra["work_limit"], 3)
        records.append(
            Record(
                name=case.name,
                ours_ms=round(o, 3),
                peer_ms=round(p, 3),
                ratio=round(o / p, 3),
                speedup=round(p / o, 3),
                peer=case.peer_name,
                ours_range_ms=(round(min(ours_r), 3), round(max(ours_r), 3)),
                peer_range_ms=(round(min(peer_r), 3), round(max(peer_r), 3)),
                gflops=round(case.flops / o / 1e6, 2) if case.flops else None,
                extra=extra,
            )
        )
        if case.teardown is not None:
            case.teardown()
    if bar is not None:
        bar.close()
    return records


def format_table(records: list[Record]) -> str:
    extra_keys: list[str] = []
    for r in records:
        for k in r.extra:
            if k not in extra_keys:
                extra_keys.append(k)
    head = ["case", "ours ms", "peer ms", "ours/peer", "peer", "GFLOP/s"] + extra_keys
    rows = []
    for r in records:
        row = [
            r.name,
            f"{r.ours_ms:.2f}",
            f"{r.peer_ms:.2f}",
            f"{r.ratio:.3f}",
            r.peer,
            "" if r.gflops is None else f"{r.gflops:.1f}",
        ]
        for k in extra_keys:
            v = r.extra.get(k, "")
            row.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        rows.append(row)
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(x) for x in rows])


def to_json(records: list[Record]) -> str:
    return json.dumps([r.as_json() for r in records], indent=1)


def plot(records: list[Record], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(records)), 4))
    xs = range(len(records))
    ax.bar([x - 0.2 for x in xs], [r.ours_ms for r in records], width=0.4, label="fastlayers")
    ax.bar([x + 0.2 for x in xs], [r.peer_ms for r in records], width=0.4, label="peer")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.name for r in records], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
