"""Paired rounds: the rotation, the ratios and their interval, and a run on a tiny UNet."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import paired


def test_rotation_puts_every_peer_in_every_position_equally_often() -> None:
    peers = ["a", "b", "c"]
    orders = [paired.rotation(peers, i) for i in range(6)]
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(order[position] for order in orders) == ["a", "a", "b", "b", "c", "c"]


def test_paired_ratios_divide_round_by_round_and_refuse_unequal_rounds() -> None:
    assert paired.paired_ratios([2.0, 3.0], [4.0, 3.0]) == [0.5, 1.0]
    with pytest.raises(ValueError, match="3 rounds for the peer but 2"):
        paired.paired_ratios([1.0, 1.0, 1.0], [1.0, 1.0])


def test_bootstrap_interval_holds_the_median_and_is_reproducible() -> None:
    values = [0.91, 0.95, 0.97, 0.98, 1.0, 1.02, 0.96, 0.94, 0.99, 0.93]
    low, high = paired.bootstrap_median_ci(values)
    assert low <= statistics.median(values) <= high
    assert (low, high) == paired.bootstrap_median_ci(values)
    assert min(values) <= low < high <= max(values)
    assert paired.bootstrap_median_ci([1.25] * 7) == (1.25, 1.25)
    # A clear shift moves the whole interval: every ratio 10 % up puts it above the old one.
    shifted_low, _ = paired.bootstrap_median_ci([v * 1.1 for v in values])
    assert shifted_low > high


def test_tiny_run_records_every_peer_with_ratios_to_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "paired.jsonl"
    argv = ["--models", "tiny-sd", "--rounds", "3", "--block", "2", "--settle", "0", "--device", "cpu"]
    argv += ["--peers", "eager", "sdpa_recompute", "--reference", "ours_torch", "--threads", "1"]
    assert paired.main([*argv, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["peer"] for r in records] == ["ours_torch", "eager", "sdpa_recompute"]
    assert records[0]["paired"] is None
    reference_blocks = records[0]["blocks_ms"]
    for record in records:
        assert record["rounds"] == 3 and record["model"] == "tiny-sd" and record["device"]["threads"] == 1
        assert [len(block) for block in record["blocks_ms"]] == [2, 2, 2]
        assert record["timing"]["repeats"] == 6
    for record in records[1:]:
        ratio = record["paired"]
        assert ratio["reference"] == "ours_torch"
        # The ratios are recomputable from the recorded steps (rounded to 0.01 ms there).
        blocks = zip(record["blocks_ms"], reference_blocks, strict=True)
        again = [statistics.median(peer) / statistics.median(ref) for peer, ref in blocks]
        assert ratio["ratios"] == pytest.approx(again, rel=1e-3)
        assert ratio["median_ratio"] == pytest.approx(statistics.median(ratio["ratios"]), abs=1e-5)
        assert ratio["ci95"][0] <= ratio["median_ratio"] <= ratio["ci95"][1]
        assert ratio["faster_rounds"] == sum(r < 1 for r in ratio["ratios"])


def test_a_spent_budget_still_runs_two_rounds(tmp_path: Path) -> None:
    out = tmp_path / "paired.jsonl"
    argv = ["--models", "tiny-sd", "--rounds", "50", "--settle", "0", "--warmup", "0", "--device", "cpu"]
    argv += ["--peers", "eager", "--reference", "ours_torch", "--budget-s", "0", "--threads", "1"]
    assert paired.main([*argv, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["rounds"] for r in records] == [2, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "1"], "--rounds >= 2"),
        (["--block", "0"], "--block >= 1"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_arguments_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        paired.main(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_a_reference_that_fell_back_from_the_cpp_backend_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(paired, "resolved_backend_name", lambda backend, device: "torch")
    monkeypatch.setattr(paired.cpp, "UNAVAILABLE_REASON", "no cached build of these sources")
    args = paired.parse_args(["--device", "cpu", "--peers", "eager"])
    assert args.peers == ["ours_torch", "eager"]
    assert "the reference is ours_torch: no cached build of these sources" in capsys.readouterr().err


def _record(run_id: str, peer: str, ratios: list[float] | None, machine: str = "cpu-a") -> dict:
    paired = None if ratios is None else {"reference": "ours_cpp", "ratios": ratios}
    return {
        "run_id": run_id,
        "device": {"name": machine, "threads": 2},
        "model": "toyworld",
        "dtype": "float32",
        "batch": 1,
        "peer": peer,
        "paired": paired,
    }


def test_pooling_joins_the_named_runs_rounds_and_refuses_what_does_not_pool() -> None:
    records = [
        _record("r1", "ours_cpp", None),
        _record("r1", "eager", [1.1, 1.2, 0.9]),
        _record("r2", "eager", [1.3, 1.05]),
        _record("r3", "eager", [0.5, 0.5]),
    ]
    (line,) = paired.pooled(records, ["r1", "r2"])
    low, high = paired.bootstrap_median_ci([1.1, 1.2, 0.9, 1.3, 1.05])
    assert line == (
        "toyworld float32 b1 eager / ours_cpp, 5 rounds (2 runs): "
        f"1.100 [{low:.3f}, {high:.3f}], eager faster in 1"
    )
    with pytest.raises(ValueError, match="no records of run"):
        paired.pooled(records, ["r1", "r9"])
    with pytest.raises(ValueError, match="different machines"):
        paired.pooled([*records, _record("r4", "eager", [1.0], machine="cpu-b")], ["r1", "r4"])


def test_pool_cli_reads_the_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "paired.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in [_record("r1", "eager", [1.2, 1.0, 1.1])]) + "\n")
    assert paired.main(["--device", "cpu", "--out", str(out), "--pool", "r1"]) == 0
    assert "1.100" in capsys.readouterr().out
    assert paired.main(["--device", "cpu", "--out", str(out), "--pool", "r2"]) == 2
    assert "no records of run(s) r2" in capsys.readouterr().err
