"""The CPU target check: which records count, and each table's verdicts from synthetic records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cpu_targets, e2e

MIB = 2**20
GIB = 2**30


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _commit(root: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return _git(root, "rev-parse", "HEAD")


def test_only_revisions_with_the_checked_out_code_match(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    old_code = _commit(tmp_path, {"csrc/op.cpp": "v1", "README.md": "a"}, "code v1")
    code = _commit(tmp_path, {"csrc/op.cpp": "v2"}, "code v2")
    docs = _commit(tmp_path, {"README.md": "b", "benchmarks/results/x.jsonl": "{}"}, "docs and results")
    revisions = [old_code, code, docs, docs + "+dirty", "0" * 40]
    assert cpu_targets.matching_revisions(revisions, tmp_path, ("csrc",)) == {code, docs}
    (tmp_path / "csrc" / "op.cpp").write_text("v3, not committed")  # the working tree is what runs
    assert cpu_targets.matching_revisions(revisions, tmp_path, ("csrc",)) == set()


def test_a_run_appending_to_the_result_files_leaves_the_revision_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records of a second run in one checkout must not be called ``+dirty`` for the first run's lines."""
    _git(tmp_path, "init", "-q")
    head = _commit(tmp_path, {"csrc/op.cpp": "v1", "benchmarks/results/e2e.jsonl": ""}, "code")
    monkeypatch.setattr(e2e, "ROOT", tmp_path)
    monkeypatch.delenv("BENCH_GIT_REVISION", raising=False)
    (tmp_path / "benchmarks/results/e2e.jsonl").write_text("{}\n")
    assert e2e.git_revision() == head
    (tmp_path / "csrc/op.cpp").write_text("v2")
    assert e2e.git_revision() == head + "+dirty"


def test_default_selection_takes_exact_revisions_and_named_ones_their_dirty_records() -> None:
    records = [
        {"device": {"type": "cpu", "name": "CPU"}, "git_revision": "abc1234def"},
        {"device": {"type": "cpu", "name": "CPU"}, "git_revision": "abc1234def+dirty"},
        {"device": {"type": "cpu", "name": "other"}, "git_revision": "abc1234def"},
    ]
    assert len(cpu_targets.selected(records, "CPU", ["abc1234def"], exact=True)) == 1
    assert len(cpu_targets.selected(records, "CPU", ["abc1234"])) == 2


def _op(
    impl: str, ms: float, peak: int | None, kind: str = "capture", threads: int = 2, date: str = "1"
) -> dict:
    return {
        "date": date,
        "git_revision": "abc1234def",
        "device": {"type": "cpu", "name": "CPU", "threads": threads},
        "model": "sd15",
        "layer": {"M": 4096, "heads": 8, "head_dim": 40},
        "batch": 1,
        "dtype": "float32",
        "pass": kind,
        "impl": impl,
        "median_ms": ms,
        "peak_bytes": peak,
    }


def test_op_rows_check_each_target() -> None:
    records = [
        # capture: 1.5x the reference, faster than compiled, same memory at the print resolution: met
        _op("cpp", 2.0, 10 * MIB),
        _op("torch", 3.0, 10 * MIB + MIB // 20),
        _op("compiled", 2.1, 12 * MIB),
        # guided: an older invocation replaced by the newest; there 1.45x the reference: not met
        _op("cpp", 1.0, 1 * MIB, "guided", date="0"),
        _op("torch", 9.0, 5 * MIB, "guided", date="0"),
        _op("compiled", 9.0, 5 * MIB, "guided", date="0"),
        _op("cpp", 2.0, 1 * MIB, "guided", date="2"),
        _op("torch", 2.9, 5 * MIB, "guided", date="2"),
        _op("compiled", 2.5, 5 * MIB, "guided", date="2"),
        # train: fast but more memory than the compiled reference: not met
        _op("cpp", 1.0, 6 * MIB, "train"),
        _op("torch", 3.0, 9 * MIB, "train"),
        _op("compiled", 2.0, 5 * MIB, "train"),
        # one thread: no compiled record, so that target is not shown as met
        _op("cpp", 1.0, MIB, threads=1),
        _op("torch", 2.0, 2 * MIB, threads=1),
        # SDXL: the newest invocation timed cpp alone; an older one's references are not mixed in
        {**_op("cpp", 1.0, MIB), "model": "sdxl"},
        {**_op("torch", 9.0, MIB), "model": "sdxl"},
        {**_op("cpp", 1.0, MIB, date="3"), "model": "sdxl"},
    ]
    rows = {
        (r["threads"], r["case"].split()[0], r["case"].rsplit(", ", 1)[1]): r
        for r in cpu_targets.op_rows(records)
    }
    assert rows[2, "sd15", "capture"]["met"] and rows[2, "sd15", "capture"]["memory"] == "equal"
    guided = rows[2, "sd15", "guided"]
    assert guided["torch_ratio"] == pytest.approx(1.45) and guided["memory"] == "lower" and not guided["met"]
    assert rows[2, "sd15", "train"]["memory"] == "higher" and not rows[2, "sd15", "train"]["met"]
    assert rows[1, "sd15", "capture"]["compiled_ratio"] is None and not rows[1, "sd15", "capture"]["met"]
    assert rows[2, "sdxl", "capture"]["torch_ratio"] is None and not rows[2, "sdxl", "capture"]["met"]


def _paired(peer: str, ratios: list[float], run: str = "r1") -> dict:
    return {
        "run_id": run,
        "git_revision": "abc1234def",
        "device": {"type": "cpu", "name": "CPU", "threads": 2},
        "model": "sd15",
        "dtype": "bfloat16",
        "batch": 1,
        "peer": peer,
        "paired": None if peer == "ours_cpp" else {"reference": "ours_cpp", "ratios": ratios},
    }


def test_ranking_pools_runs_and_calls_only_intervals_clear_of_one() -> None:
    records = [
        _paired("ours_cpp", []),
        _paired("eager", [1.02, 1.03, 1.01, 1.04]),
        _paired("eager", [1.02, 1.05], run="r2"),
        _paired("sdpa_recompute", [0.97, 1.03, 0.99, 1.02, 1.0, 1.01]),
        _paired("all_eager", [0.9, 0.95, 0.92]),
        _paired("guided_floor", [0.98, 0.99, 0.97]),
    ]
    rows = {r["peer"]: r for r in cpu_targets.ranking_rows(records)}
    assert "ours_cpp" not in rows
    assert (rows["eager"]["rounds"], rows["eager"]["runs"], rows["eager"]["verdict"]) == (6, 2, "ours ahead")
    assert rows["sdpa_recompute"]["verdict"] == "not resolved"
    assert rows["all_eager"]["verdict"] == "ours behind"
    assert rows["guided_floor"]["verdict"] == "compute floor"


def _e2e(
    peer: str,
    gib: float,
    status: str = "ok",
    source: str = "peak_rss",
    batch: int = 1,
    tensors_mib: float | None = None,
) -> dict:
    memory = {"peak_allocated_bytes": int(gib * GIB), "source": source}
    if tensors_mib is not None:
        memory["step_tensor_peak_bytes"] = int(tensors_mib * MIB)
    return {
        "git_revision": "abc1234def",
        "device": {"type": "cpu", "name": "CPU", "threads": 2},
        "model": "sd15",
        "dtype": "float32",
        "batch": batch,
        "peer": peer,
        "workload": "step",
        "status": status,
        "memory": memory,
    }


def test_memory_rows_need_ours_below_every_process_of_every_guided_peer() -> None:
    records = [
        _e2e("ours_cpp", 8.9, tensors_mib=500.0),
        _e2e("ours_cpp", 8.95, tensors_mib=500.0),
        _e2e("eager", 9.1, tensors_mib=700.0),
        _e2e("sdpa_recompute", 9.0),  # an older record without the tensor peak
        _e2e("sdpa_recompute", 9.05, tensors_mib=499.0),
        _e2e("guided_floor", 8.8, tensors_mib=400.0),  # the floor takes no maps: not a peer to beat
        _e2e("floor", 7.0),  # an unguided workload
        _e2e("eager", 1.0, status="oom"),
        _e2e("eager", 1.0, source="cuda_allocator"),
        _e2e("ours_cpp", 14.3, batch=4),
        _e2e("eager", 14.2, batch=4),
        _e2e("eager", 15.3, batch=4),
    ]
    rows = {r["case"]: r for r in cpu_targets.memory_rows(records, "ours_cpp")}
    b1, b4 = rows["sd15 float32 b1"], rows["sd15 float32 b4"]
    assert b1["rss"]["met"] and set(b1["rss"]["others"]) == {"eager", "sdpa_recompute"}
    assert b1["rss"]["ours"] == (int(8.9 * GIB), int(8.95 * GIB), 2)
    assert b1["rss"]["others"]["sdpa_recompute"] == (int(9.0 * GIB), int(9.05 * GIB), 2)
    # by the step's tensors SDPA + recompute holds 1 MiB less, and only its newer record counts
    assert not b1["tensors"]["met"]
    assert b1["tensors"]["others"]["sdpa_recompute"] == (int(499 * MIB), int(499 * MIB), 1)
    assert not b4["rss"]["met"] and b4["tensors"] is None


def test_report_runs_on_written_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, rows in {
        "cpu_ops": [_op("cpp", 2.0, MIB), _op("torch", 3.5, 2 * MIB), _op("compiled", 2.2, 2 * MIB)],
        "paired": [_paired("ours_cpp", []), _paired("eager", [1.02, 1.03, 1.04])],
        "e2e": [_e2e("ours_cpp", 8.9), _e2e("eager", 9.1)],
    }.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--results", str(tmp_path), "--machine", "CPU", "--revisions", "abc1234", "--ours", "ours_cpp"]
    assert cpu_targets.main(args) == 0
    out = capsys.readouterr().out
    assert "1 of 1 op rows meet every target." in out
    assert "| 2 | sd15 float32 b1 | 8.90 (1) | eager 9.10 (1) | yes | - | - | - |" in out


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_cpu.sh"


def test_protocol_script_refuses_an_unknown_stage() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown stage 'bogus'" in result.stderr


def test_protocol_script_checks_the_targets_of_the_committed_records() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "targets"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "## Op: cpp vs the torch reference" in result.stdout
    assert "## Memory: isolated processes" in result.stdout
