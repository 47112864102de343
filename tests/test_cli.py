"""The `fastlayers` command line: info, check, kernels, bench --json / --plot."""

import json
import subprocess
import sys

import pytest

from fastlayers import cli


def test_info_lists_versions_devices_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu" in out
    assert "backends by device" in out
    for op in (
        "bias_dropout_residual_layer_norm",
        "bias_gelu",
        "bias_geglu",
        "masked_softmax",
        "attention",
        "token_gather",
        "token_scatter",
        "nhwc_bias_add",
    ):
        assert op in out


def test_check_passes_on_cpu(capsys):
    assert cli.main(["check", "layer_norm"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failed" in out


def test_check_rejects_unknown_op(capsys):
    assert cli.main(["check", "nope"]) == 2


def test_bench_json_records(capsys):
    assert cli.main(["bench", "layer_norm", "--quick", "--json", "--rounds", "1", "--reps", "1"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records
    for r in records:
        for key in ("name", "ours_ms", "peer_ms", "ratio"):
            assert key in r
        assert r["ours_ms"] > 0 and r["peer_ms"] > 0
        assert abs(r["ratio"] - r["ours_ms"] / r["peer_ms"]) < 0.01 * r["ratio"] + 1e-3


def test_bench_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    assert cli.main(["bench", "bias_gelu", "--quick", "--rounds", "1", "--reps", "1", "--plot", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 1000


def test_kernels_table_via_console_entry_point():
    pytest.importorskip("triton")
    out = subprocess.run(
        [sys.executable, "-m", "fastlayers.cli", "kernels", "--archs", "80"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sm_80" in out.stdout and "0 failed or spilling" in out.stdout


@pytest.mark.slow
def test_check_all_ops_pass(capsys):
    """`fastlayers check` over every op (under the interpreter on CPU: torch and triton backends)."""
    assert cli.main(["check"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    ops = ("layer_norm", "bias_gelu", "bias_geglu", "softmax", "attention", "transformer", "sparse", "random_ltd")
    for op in (*ops, "bias_add"):
        assert f"PASS  {op}/" in out
