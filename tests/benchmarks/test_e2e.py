"""End-to-end benchmark harness: the smoke run, its records' schema, the CLI alias, the plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from benchmarks import e2e
from benchmarks.peers import PEERS
from benchmarks.schema import RESULT_SCHEMA, SchemaError, validate
from dreamblend.cli import main as cli_main

# Peers that must run anywhere; the others depend on the device or on optional packages.
PORTABLE = ("plain", "floor", "guided_floor", "eager", "all_eager", "sdpa_recompute", "ours_torch")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One in-process ``--smoke`` run on CPU (tiny SD and SDXL UNets, every peer, steps and images)."""
    out = tmp_path_factory.mktemp("e2e") / "smoke.jsonl"
    assert e2e.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    return read_records(out)


def test_smoke_runs_every_peer_workload_and_model(smoke: list[dict]) -> None:
    seen = {(r["model"], r["workload"], r["steps"], r["peer"]): r for r in smoke}
    configurations = [("step", 1), ("image", 1), ("image", 2)]
    for model in ("tiny-sd", "tiny-sdxl"):
        for workload, steps in configurations:
            for peer in PEERS:
                record = seen[(model, workload, steps, peer)]
                if peer in PORTABLE:
                    assert record["status"] == "ok", record
                else:
                    assert record["status"] in ("ok", "unavailable"), record
    triton = seen[("tiny-sd", "step", 1, "ours_triton")]
    assert triton["status"] == "unavailable" and "CUDA" in triton["error"]
    ok = [r for r in smoke if r["status"] == "ok"]
    assert all(r["timing"]["median_ms"] > 0 and r["timing"]["timer"] == "perf_counter" for r in ok)
    assert all((r["images_per_s"] is not None) == (r["workload"] == "image") for r in ok)
    assert all(r["memory"] is None and r["smoke"] for r in smoke)  # CPU: no allocator statistics


def test_smoke_records_match_schema(smoke: list[dict]) -> None:
    for record in smoke:
        validate(record)
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(RESULT_SCHEMA)
    validator.check_schema(RESULT_SCHEMA)
    for record in smoke:
        validator.validate(record)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("git_revision"), "missing"),
        (lambda r: r.update(batch=0), "below"),
        (lambda r: r.update(dtype="float8"), "not one of"),
        (lambda r: r.update(extra=1), "unexpected"),
        (lambda r: r["timing"].update(median_ms="fast"), "expected number"),
        (lambda r: r.update(status="oom"), "expected null"),  # a failed record carries no timing
        (lambda r: r.update(timing=None), "expected object"),  # a measured one does
    ],
)
def test_schema_rejects_malformed_records(smoke: list[dict], change, message: str) -> None:
    record = copy.deepcopy(next(r for r in smoke if r["status"] == "ok"))
    change(record)
    with pytest.raises(SchemaError, match=message):
        validate(record)


def test_cli_alias_runs_the_same_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "alias.jsonl"
    argv = ["bench", "--smoke", "--models", "tiny-sd", "--peers", "ours_torch", "--workloads", "step"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    (record,) = read_records(out)
    assert (record["peer"], record["workload"], record["status"]) == ("ours_torch", "step", "ok")


def test_plots_from_smoke_records(smoke: list[dict], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.plot import load, plot_all

    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in smoke + smoke[:3]), encoding="utf-8")
    records = load([results])
    assert len(records) == len(smoke)  # repeated configurations keep only the latest record
    written = plot_all(records, tmp_path / "plots")
    names = {p.name for p in written}
    assert {
        "tiny-sd_float32_step.png",
        "tiny-sd_float32_image_2steps.png",
        "tiny-sd_float32_b2_steps.png",
    } <= names
    assert all(p.stat().st_size > 0 for p in written)


@pytest.mark.gpu
def test_lockstep_memory_is_flat_in_steps(tmp_path: Path) -> None:
    out = tmp_path / "steps.jsonl"
    peers = ["eager", "ours_torch", "ours_triton"]
    argv = ["--models", "tiny-sd", "--dtypes", "float16", "--batches", "2", "--workloads", "image"]
    argv += ["--steps", "2", "8", "--peers", *peers, "--warmup", "1", "--image-repeats", "1"]
    assert e2e.main([*argv, "--device", "cuda", "--out", str(out)]) == 0
    peaks = {(r["peer"], r["steps"]): r["memory"]["peak_allocated_bytes"] for r in read_records(out)}
    for peer in peers:
        assert peaks[(peer, 8)] <= 1.05 * peaks[(peer, 2)], peaks


def test_out_of_memory_is_a_result_and_errors_are_recorded() -> None:
    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    def broken() -> dict:
        raise ValueError("bad shape")

    assert e2e.guarded(oom, fail_fast=False) == {
        "status": "oom",
        "error": "CUDA out of memory. Tried to allocate 20.00 GiB",
        "timing": None,
        "memory": None,
        "images_per_s": None,
    }
    assert e2e.guarded(broken, fail_fast=False)["error"] == "ValueError: bad shape"
    with pytest.raises(ValueError):
        e2e.guarded(broken, fail_fast=True)


def test_models_that_do_not_fit_are_recorded_as_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    monkeypatch.setattr(e2e, "build_unet", no_room)
    out = tmp_path / "oom.jsonl"
    argv = ["--smoke", "--models", "tiny-sd", "--peers", "ours_torch", "ours_triton", "--workloads", "step"]
    assert e2e.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    ours, triton = read_records(out)
    assert ours["status"] == "oom" and ours["error"].startswith("building G and E: CUDA out of memory")
    assert triton["status"] == "unavailable"


def test_isolated_cpu_configurations_record_peak_rss(tmp_path: Path) -> None:
    """--isolate: one child process per configuration, each recording its own peak resident memory."""
    out = tmp_path / "isolated.jsonl"
    argv = ["--models", "tiny-sd", "--dtypes", "float32", "--batches", "1", "--workloads", "step"]
    argv += ["--peers", "floor", "ours_torch", "ours_torch"]
    argv += ["--warmup", "1", "--repeats", "1", "--threads", "1"]
    assert e2e.main([*argv, "--device", "cpu", "--isolate", "--out", str(out)]) == 0
    records = read_records(out)
    assert [r["peer"] for r in records] == ["floor", "ours_torch", "ours_torch"]
    # The step's tensor peak is the same in every process of a configuration, and a guided step
    # (E's forward kept for its backward) holds more than the floor's unguided one.
    floor, ours, again = (r["memory"]["step_tensor_peak_bytes"] for r in records)
    assert ours == again and ours > floor > 0
    for record in records:
        validate(record)
        memory = record["memory"]
        assert record["status"] == "ok" and memory["source"] == "peak_rss"
        peak, static = memory["peak_allocated_bytes"], memory["static_allocated_bytes"]
        assert peak >= static > 2 * memory["unet_weight_bytes"]
        assert record["device"]["threads"] == 1 and record["device"]["cpu_count"] >= 1
