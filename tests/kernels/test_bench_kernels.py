"""benchmarks/bench_kernels.py: its peers compute the same outputs, maps, losses and gradients
(tiny shapes, kernels interpreted on CPU), and without CUDA it exits saying why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import assert_close

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_kernels as bench  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_exits_with_a_message_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--quick", "--output", str(tmp_path / "kernels.jsonl")])
    assert not (tmp_path / "kernels.jsonl").exists()


@pytest.mark.parametrize(("tokens", "head_mean"), [(None, False), (3, True)], ids=["all-heads", "tok3-mean"])
def test_peers_compute_the_same_thing(tokens: int | None, head_mean: bool, device: torch.device) -> None:
    p = bench.make_problem(bench.Layer("tiny", 40, 2, 16), 2, torch.float32, device, tokens, head_mean)
    captured = {name: fn() for name, fn in bench.capture_impls(p).items()}
    out_ref, maps_ref = (t.double() for t in captured.pop("eager"))
    for name, (out, maps) in captured.items():
        assert_close(out, out_ref, torch.float32, f"{name} out")
        if maps is not None:
            assert_close(maps, maps_ref, torch.float32, f"{name} maps")
    guided = {name: fn() for name, fn in bench.guided_impls(p).items()}
    out_ref, loss_ref, dq_ref = (t.double() for t in guided.pop("eager"))
    for name, (out, loss, dq) in guided.items():
        assert_close(out, out_ref, torch.float32, f"{name} out")
        if loss is not None:  # peers without maps differ in dq by the loss gradient
            assert_close(loss, loss_ref, torch.float32, f"{name} loss")
            assert_close(dq, dq_ref, torch.float32, f"{name} dq")
