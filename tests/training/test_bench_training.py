"""The training benchmark script: its CPU smoke run writes complete records; without CUDA it refuses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_training.py"


def test_smoke_run_appends_one_record_per_method(tmp_path):
    out = tmp_path / "training.jsonl"
    out.write_text('{"earlier": "record"}\n')
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    earlier, *records = (json.loads(line) for line in out.read_text().splitlines())
    assert earlier == {"earlier": "record"}
    assert [r["method"] for r in records] == ["floor", "capture", "all_eager"]
    for record in records:
        assert record["status"] == "ok" and record["smoke"] is True and record["bench"] == "training"
        assert record["timing"]["median_ms"] > 0 and record["timing"]["repeats"] == 2
        assert record["versions"]["torch"] == torch.__version__ and record["git_revision"]
        assert (record["model"], record["batch"], record["stage"], record["tokens"]) == (
            "tiny-sd",
            2,
            3,
            [5, 6],
        )
        assert record["date"] and record["device"]["type"] in ("cpu", "cuda")
    floor, capture, eager = records
    assert floor["loss_reg"] is None and capture["backend"] and eager["backend"] is None
    assert capture["loss_reg"] == pytest.approx(eager["loss_reg"], rel=1e-4)  # same regularizer, two paths
    assert "floor" in done.stdout and "ms/step" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "never.jsonl")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "never.jsonl").exists()
