"""The map work per guided step: layer counts of the published UNets and the sums over op records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import map_work
from benchmarks.models import MODELS


def test_layer_counts_of_the_published_unets() -> None:
    """SD1.5 at 512 px: 2 + 2 + 2 down, 1 mid, 3 + 3 + 3 up; SDXL at 1024 px: transformer depths 2 and
    10 (down 2 x 2 and 2 x 10, mid 10, up 3 x 10 and 3 x 2)."""
    assert map_work.cross_attention_layers(MODELS["sd15"]) == Counter(
        {(4096, 8, 40): 5, (1024, 8, 80): 5, (256, 8, 160): 5, (64, 8, 160): 1}
    )
    assert map_work.cross_attention_layers(MODELS["sdxl"]) == Counter(
        {(4096, 10, 64): 10, (1024, 20, 64): 60}
    )


SD15_HEAD_DIMS = {4096: 40, 1024: 80, 256: 160, 64: 160}


def _record(impl: str, m: int, kind: str, ms: float, revision: str = "abc123", threads: int = 2) -> dict:
    return {
        "git_revision": revision,
        "device": {"threads": threads},
        "model": "sd15",
        "dtype": "float32",
        "batch": 1,
        "layer": {"M": m, "heads": 8, "head_dim": SD15_HEAD_DIMS[m]},
        "impl": impl,
        "pass": kind,
        "median_ms": ms,
    }


def test_sums_weight_each_shape_by_its_layers_and_list_what_is_missing() -> None:
    layers = Counter({(4096, 8, 40): 5, (1024, 8, 80): 2, (64, 8, 160): 1})
    records = [
        _record("cpp", 4096, "capture", 1.0),
        _record("cpp", 4096, "guided", 2.0),
        _record("cpp", 1024, "capture", 0.5),
        _record("cpp", 1024, "guided", 0.25),
        _record("eager", 4096, "capture", 3.0),
        _record("eager", 4096, "guided", 4.0),
        _record("eager", 1024, "capture", 1.0),
        _record("eager", 1024, "guided", 1.0),
        _record("torch", 4096, "capture", 9.0),  # no guided pass, nor any 1024 record: left out
    ]
    totals, missing = map_work.map_work(records, layers)
    assert totals == {"cpp": 5 * 3.0 + 2 * 0.75, "eager": 5 * 7.0 + 2 * 2.0}
    assert missing == [(64, 8, 160)]


def test_select_keeps_one_configuration_and_the_latest_record() -> None:
    records = [
        _record("cpp", 4096, "capture", 1.0),
        _record("cpp", 4096, "capture", 1.5),  # a rerun at the same revision replaces the first
        _record("cpp", 4096, "capture", 9.0, revision="def456"),
        _record("cpp", 4096, "capture", 9.0, threads=1),
    ]
    (chosen,) = map_work.select(records, "sd15", "abc", "float32", 1, 2)
    assert chosen["median_ms"] == 1.5
    elsewhere = {**_record("eager", 4096, "capture", 2.0), "device": {"threads": 2, "name": "other CPU"}}
    with pytest.raises(ValueError, match="several machines"):
        map_work.select([*records, elsewhere], "sd15", "abc", "float32", 1, 2)
    (chosen,) = map_work.select([*records, elsewhere], "sd15", "abc", "float32", 1, 2, machine="other CPU")
    assert chosen["impl"] == "eager"


def test_cli_prints_the_margins_and_refuses_an_unknown_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cpu_ops.jsonl"
    lines = [
        _record(impl, m, kind, ms)
        for m in (4096, 1024, 256)
        for impl, ms in (("cpp", 1.0), ("eager", 2.0))
        for kind in ("capture", "guided")
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert map_work.main(["--revision", "abc", "--records", str(path), "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "cpp 30.0, eager 60.0 (+30.0)" in out  # 5 layers x 3 shapes x 2 passes
    assert "[(64, 8, 160)]" in out
    assert map_work.main(["--revision", "zzz", "--records", str(path)]) == 2
    assert "no op records" in capsys.readouterr().err
