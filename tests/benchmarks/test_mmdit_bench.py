"""MMDiT benchmark: the smoke run (every peer, both workloads), like-for-like peers, the published
configs' sizes, the computed memory figures and the argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from benchmarks import mmdit

PEERS = ("floor", "ours", "ours_torch", "eager")


def smoke(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "mmdit.jsonl"
    assert mmdit.main(["--smoke", "--device", "cpu", "--peers", *PEERS, "--out", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("workload", ["step", "layer"])
def test_smoke_runs_every_peer_on_both_models(tmp_path: Path, workload: str) -> None:
    rounds = 2 if workload == "layer" else 1  # the layer workload is cheap enough to check the rounds
    records = smoke(tmp_path, "--workload", workload, "--rounds", str(rounds))
    for model in mmdit.SMOKE_MODELS:
        order = [(r["round"], r["peer"]) for r in records if r["model"] == model]
        assert order == [(0, p) for p in PEERS] + [(1, p) for p in PEERS[::-1]][: 4 * (rounds - 1)]
    for r in records:
        assert r["status"] == "ok", r
        assert r["workload"] == workload and r["smoke"] and r["device"]["threads"] == 1
        timing = r["timing"]
        assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"] and timing["repeats"] == 1
        assert {"torch", "diffusers", "cpp_extension"} <= set(r["versions"])
        assert r["memory"] is None  # in-process CPU runs have no per-configuration peak
    flux = next(r for r in records if r["model"] == "tiny-flux")
    sd3 = next(r for r in records if r["model"] == "tiny-sd3")
    assert flux["text"] == [0, 7] and sd3["text"] == [sd3["image_tokens"], 7]  # FLUX text first, SD3 last
    assert next(r for r in records if r["peer"] == "ours_torch")["backend"] == "torch"


@pytest.mark.parametrize("model", list(mmdit.SMOKE_MODELS))
def test_guided_peers_give_the_same_latent_gradient(model: str) -> None:
    """ours (C++ on CPU when built), the torch reference and the eager softmax compute one objective."""
    spec = mmdit.SMOKE_MODELS[model]
    args = mmdit.parse_args(["--smoke", "--models", model, "--device", "cpu"])
    net = spec.build(None, torch.float32, torch.device("cpu"))
    grads = {}
    for peer in ("ours", "ours_torch", "eager"):
        step = mmdit.guided_step(spec, net, peer, args)
        try:
            grads[peer] = step()
        finally:
            step.close()
    scale = grads["eager"].abs().max()
    assert scale > 0
    # float32 through every block: ~1e-6 relative per op; the L1 signs cannot flip (ref = 0.9 * maps)
    for peer in ("ours", "ours_torch"):
        torch.testing.assert_close(grads[peer], grads["eager"], rtol=1e-4, atol=1e-4 * scale)


def test_published_configs_have_the_published_sizes() -> None:
    """FLUX.1-dev is a 12 B transformer; SD3.5-medium 2.5 B with its (persistent) position table."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**mmdit.FLUX_DEV)
        sd3 = SD3Transformer2DModel(**mmdit.SD35_MEDIUM)
    assert 11.8e9 < sum(p.numel() for p in flux.parameters()) < 12.0e9
    assert 2.4e9 < sum(t.numel() for t in (*sd3.parameters(), *sd3.buffers())) < 2.55e9
    assert mmdit.MODELS["flux-dev"].joint_layers(None) == 57
    assert mmdit.MODELS["sd35-medium"].joint_layers(None) == 24


def test_computed_memory_matches_the_joint_attention_doc() -> None:
    """docs/joint_attention.md: an eager FLUX.1 map at 1024 px is 2.04 GB per layer, 116 GB over 57."""
    args = mmdit.parse_args(["--models", "flux-dev", "--resolution", "1024", "--device", "cpu"])
    figures = mmdit.computed_memory(mmdit.MODELS["flux-dev"], args)
    assert figures["eager_map_bytes_per_layer"] == 24 * 4608 * 4608 * 4
    assert round(figures["eager_map_bytes"] / 1e9) == 116
    assert figures["ours_ref_map_bytes_per_layer"] == 24 * 4096 * 512 * 4


def test_truncation_keeps_only_existing_dual_attention_layers() -> None:
    spec = mmdit.MODELS["sd35-medium"]
    assert spec.depth([2]) == {"num_layers": 2, "dual_attention_layers": (0, 1)}
    assert mmdit.MODELS["flux-dev"].depth([2, 4]) == {"num_layers": 2, "num_single_layers": 4}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--models", "flux-dev", "--blocks", "2"], "double- and single-stream"),
        (["--models", "sd35-medium", "--blocks", "2", "4"], "one number"),
        (["--resolution", "100"], "multiple of 16"),
        (["--repeats", "0"], "positive"),
    ],
)
def test_bad_arguments_are_named(argv: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        mmdit.parse_args(argv)
    assert match in capsys.readouterr().err
