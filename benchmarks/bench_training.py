"""Training-step cost of AttnDreamBooth's cross-attention map regularizer: our capture op vs eager maps.

One AttnDreamBooth step (diffusion loss + the regularizer on the [V] and category maps of every
cross-attention layer, backward, AdamW) is timed on a UNet with a published architecture and random
weights, three ways, in one process on one device with the same inputs:

- ``floor``: SDPA everywhere, diffusion loss only (the step without a regularizer);
- ``capture``: :class:`dreamblend.AttentionStore` recording the two token columns through the
  capture op (probabilities recomputed in its backward);
- ``all_eager``: the authors' released approach: ``AttnProcessor`` (materialized probabilities) on
  every layer, the cross-attention probabilities taken from ``get_attention_scores`` and kept in
  the autograd graph.

Each method appends one JSON line (median and spread of the step time, peak memory, device, versions,
shapes, dtype, git revision, date) to ``benchmarks/results/training.jsonl``. It needs a CUDA device;
``--smoke`` runs a tiny model (on CPU if there is no GPU) to check the script itself and writes only
where ``--out`` says.

    python -m benchmarks.bench_training --model sd15 --batch 8 --dtype bfloat16 --stage 3
    python benchmarks/bench_training.py --smoke --out /tmp/training.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(ROOT))

from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

from benchmarks.e2e import DTYPES, environment, summarize, time_ms  # noqa: E402
from benchmarks.models import MODELS, SMOKE_MODELS, TEXT_TOKENS, build_unet  # noqa: E402
from dreamblend import AttentionStore, attach  # noqa: E402
from dreamblend.ops import resolve_backend  # noqa: E402
from dreamblend.store import is_cross_attention  # noqa: E402
from dreamblend.training.regularizer import attention_map_regularizer  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "training.jsonl"
METHODS = ("floor", "capture", "all_eager")
TOKENS = [5, 6]  # "<bos> a photo of a [V] dog": the [V] and category positions
LAMBDAS = {"lambda_mu": 2.0, "lambda_sigma": 5.0}  # AttnDreamBooth stages 2 and 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="sd15", help="UNet architecture (default sd15)"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per step (paper: 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="autocast dtype")
    parser.add_argument(
        "--stage",
        type=int,
        choices=(1, 2, 3),
        default=3,
        help="trained tensors: 1 text embedding, 2 attn2, 3 UNet",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--backend", default="auto", help="capture op backend (default auto)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSONL file to append to (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, few steps: checks the script, not speed"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.warmup, args.repeats = "tiny-sd", 2, 1, 2
        if not torch.cuda.is_available():
            args.dtype = "float32"
    elif args.out is None:
        args.out = DEFAULT_OUT
    return args


class MaterializedMaps:
    """AttnDreamBooth's way to the maps: ``AttnProcessor`` on every layer, probabilities kept with grad."""

    def __init__(self, unet: nn.Module, tokens: Sequence[int]) -> None:
        self.maps: dict[str, Tensor] = {}
        self.active = False
        self._unet, self._previous = unet, dict(unet.attn_processors)
        self._wrapped: list[nn.Module] = []
        unet.set_attn_processor(AttnProcessor())
        index = torch.tensor(list(tokens))
        for name, module in unet.named_modules():
            if is_cross_attention(module):
                module.get_attention_scores = partial(
                    self._scores, name, module, module.get_attention_scores, index
                )
                self._wrapped.append(module)

    def _scores(self, name: str, module: nn.Module, original, index: Tensor, query, key, mask=None) -> Tensor:
        probs = original(query, key, mask)  # (B*H, M, N)
        if self.active:
            self.maps[name] = probs.unflatten(0, (-1, module.heads))[..., index.to(probs.device)].float()
        return probs

    @contextlib.contextmanager
    def record(self) -> Iterator[MaterializedMaps]:
        self.maps, self.active = {}, True
        try:
            yield self
        finally:
            self.active = False

    def close(self) -> None:
        for module in self._wrapped:
            del module.get_attention_scores
        self._unet.set_attn_processor(self._previous)


@contextlib.contextmanager
def method_installed(method: str, unet: nn.Module, backend: str) -> Iterator[Any]:
    """The method's map source for the block (None for the floor); SDPA everywhere afterwards."""
    unet.set_attn_processor(AttnProcessor2_0())
    if method == "floor":
        yield None
    elif method == "capture":
        with attach(unet, AttentionStore(tokens=TOKENS, backend=backend)) as store:
            yield store
    else:
        maps = MaterializedMaps(unet, TOKENS)
        try:
            yield maps
        finally:
            maps.close()


def trainable(unet: nn.Module, stage: int, context: Tensor) -> list[Tensor]:
    """The tensors a stage trains; stage 1's text embedding is stood in for by the context itself."""
    unet.requires_grad_(False)
    if stage == 1:
        return [context.requires_grad_(True)]
    params = [p for n, p in unet.named_parameters() if stage == 3 or ".attn2." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def training_inputs(unet: nn.Module, spec, batch: int, device: torch.device) -> dict[str, Any]:
    """Random latents, noise, timesteps and text conditioning of the model's real shapes (77 tokens)."""
    config = unet.config
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    size = config.sample_size
    inputs = {
        "latents": randn(batch, config.in_channels, size, size),
        "noise": randn(batch, config.in_channels, size, size),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "context": randn(batch, TEXT_TOKENS, config.cross_attention_dim),
        "added": None,
    }
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and micro-conditioning
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        res = float(spec.resolution)
        time_ids = torch.tensor([[res, res, 0.0, 0.0, res, res]], device=device).repeat(batch, 1)
        inputs["added"] = {"text_embeds": randn(batch, pooled), "time_ids": time_ids}
    return inputs


def measure(
    method: str, unet: nn.Module, spec, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    inputs = training_inputs(unet, spec, args.batch, device)
    context, noise, timesteps = inputs["context"], inputs["noise"], inputs["timesteps"]
    params = trainable(unet, args.stage, context)
    # lr 0: AdamW does all its work but leaves the weights as they are, so every method sees the same
    # model and their regularizer values are comparable
    optimizer = torch.optim.AdamW(params, lr=0.0)
    noisy = inputs["latents"] + noise  # the noise level does not change the cost
    amp = dict(device_type=device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "float32")
    regularizer: list[Tensor] = []  # the first step's value (read after timing: no sync inside a step)

    with method_installed(method, unet, args.backend) as source:

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if source is None else source.record():
                with torch.autocast(**amp):
                    pred = unet(noisy, timesteps, context, added_cond_kwargs=inputs["added"]).sample
                    loss = F.mse_loss(pred.float(), noise)
                    if source is not None:
                        reg = attention_map_regularizer(source.maps, **LAMBDAS)
                        loss = loss + reg
                        if not regularizer:
                            regularizer.append(reg.detach())
                loss.backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        times = time_ms(step, args.repeats, device)
        optimizer.zero_grad(set_to_none=True)  # the next method starts without this one's gradients
    memory = None
    if device.type == "cuda":
        memory = {
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "static_allocated_bytes": static,
        }
    return {
        "trainable_params": sum(p.numel() for p in params),
        "timing": summarize(times, args.warmup, device),
        "memory": memory,
        "loss_reg": float(regularizer[0]) if regularizer else None,
    }


def backend_name(spec: str, device: torch.device) -> str:
    """The backend ``spec`` (e.g. "auto") resolves to on ``device``, by name."""
    chosen = resolve_backend(spec, device)
    for name in ("triton", "cpp", "torch"):
        with contextlib.suppress(RuntimeError):
            if resolve_backend(name, device) is chosen:
                return name
    return spec


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = {**MODELS, **SMOKE_MODELS}[args.model]
    unet = build_unet(spec, 0, torch.float32, device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    shared = {k: v for k, v in environment(device, args.smoke).items() if k != "schema_version"}
    backend = backend_name(args.backend, device)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        record = {
            "bench": "training",
            **shared,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": spec.name,
            "stage": args.stage,
            "batch": args.batch,
            "resolution": spec.resolution,
            "latent_size": unet.config.sample_size,
            "text_tokens": TEXT_TOKENS,
            "tokens": TOKENS,
            "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
            "method": method,
            "backend": backend if method == "capture" else None,
        }
        try:
            record.update(status="ok", error=None, **measure(method, unet, spec, args, device))
        except torch.cuda.OutOfMemoryError as exc:
            record.update(
                status="oom", error=str(exc).splitlines()[0], timing=None, memory=None, loss_reg=None
            )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out is not None:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        print(describe(record), flush=True)
    return 0


def describe(record: dict[str, Any]) -> str:
    head = f"{record['model']} stage {record['stage']} batch {record['batch']} {record['dtype']}"
    head += f" {record['method']:>9}"
    if record["status"] != "ok":
        return f"{head}: {record['status']} ({record['error']})"
    text = f"{head}: {record['timing']['median_ms']:.1f} ms/step"
    if record["memory"]:
        text += f", peak {record['memory']['peak_allocated_bytes'] / 2**30:.2f} GiB"
    if record["loss_reg"] is not None:
        text += f", reg {record['loss_reg']:.3e}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "bench_training.py measures GPU training steps, but no CUDA device is available; run it on a GPU "
            "machine, or pass --smoke to check the script on CPU (its numbers are not benchmarks)",
            file=sys.stderr,
        )
        return 2
    threads = torch.get_num_threads()
    if args.smoke and not torch.cuda.is_available():
        torch.set_num_threads(1)  # speed is not measured in a CPU smoke run
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
