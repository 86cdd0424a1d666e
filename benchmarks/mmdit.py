"""MMDiT benchmark: DreamBlend's guided step on FLUX.1-dev and SD3.5-medium transformers, per peer.

The guided step is E's inner step of Algorithm 1: a forward of the transformer with the joint
attention maps scored against reference maps (L1, DESIGN §2) and the backward to the latent. Models
are built from the published configs below with seeded random weights (no download; speed does not
depend on the weights); ``--blocks`` truncates the depth at full width, since FLUX.1-dev (12 B
parameters) fits no 24 GB device. Peers:

- ``floor``: stock processors, forward + backward to the latent from a zero-weighted sum of the joint
  layers' attention outputs: the passes any guided step runs, without maps;
- ``ours``: ``dreamblend.mmdit`` processors, ``backend="auto"`` (triton on CUDA, C++ on CPU);
- ``ours_torch``: the same with the chunked-recompute torch reference (run when auto picks another);
- ``eager``: the hand-written way: SDPA replaced by an explicit ``(B, H, L, L)`` softmax while the
  stock processors run, the image x text block sliced out, L1 in torch.

``--workload layer`` times one joint attention layer of the model's shape instead (the op alone,
fwd + bwd in q, k, v), which is how the C++ joint path was judged against the reference.

Every configuration appends one JSON line to ``benchmarks/results/mmdit.jsonl``. On CPU each runs
in its own process (peak RSS, as ``benchmarks.e2e``); on CUDA in-process with allocator peaks.

    python -m benchmarks.mmdit --smoke                         # tiny widths, seconds
    python -m benchmarks.mmdit --models flux-dev --blocks 1 1 --resolution 256 --threads 1
    python -m benchmarks.mmdit --models sd35-medium flux-dev --resolution 1024 --dtype bfloat16  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import Tensor, nn

from benchmarks.e2e import (
    environment,
    git_revision,
    guarded,
    not_measured,
    proc_status_bytes,
    release,
    reset_peak_rss,
    summarize,
    time_ms,
)
from dreamblend import AttentionStore, ops
from dreamblend.mmdit import attach
from dreamblend.ops.reference import l1_map_loss
from dreamblend.store import is_attention, is_joint_attention

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mmdit.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# black-forest-labs/FLUX.1-dev, transformer/config.json (diffusers FluxTransformer2DModel); the same
# numbers are FluxTransformer2DModel's defaults in diffusers 0.42 apart from guidance_embeds.
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 VAE channels x 2x2 patches packed by the pipeline
    "out_channels": None,
    "num_layers": 19,  # double-stream blocks
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL
    "pooled_projection_dim": 768,  # CLIP-L pooled
    "guidance_embeds": True,  # dev is guidance-distilled (schnell: False)
    "axes_dims_rope": (16, 56, 56),
}
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel, MMDiT-X).
# dual_attention_layers: the model card's MMDiT-X adds self-attention to the first 13 blocks; written
# from the config as recalled, (0, ..., 12): not checked against the file here.
SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128,  # 1024 px / VAE factor 8
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,  # = heads x head_dim
    "pooled_projection_dim": 2048,  # CLIP-L 768 + CLIP-G 1280
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
VAE_FACTOR = 8  # both models' VAEs downsample 8x


@dataclass(frozen=True)
class MMDiTSpec:
    """A transformer architecture, where its text block sits and how many text tokens it sees."""

    name: str
    kind: str  # "flux" or "sd3"
    config: dict[str, Any]
    text_tokens: int  # FLUX.1-dev: T5 max_sequence_length 512; SD3: CLIP 77 + T5 256

    def depth(self, blocks: Sequence[int] | None) -> dict[str, Any]:
        """Config fields for ``blocks``: (double, single) for FLUX, (layers,) for SD3; None = full."""
        if blocks is None:
            return {}
        if self.kind == "flux":
            if len(blocks) != 2:
                raise ValueError(f"--blocks for {self.name} takes two numbers: double- and single-stream")
            return {"num_layers": blocks[0], "num_single_layers": blocks[1]}
        if len(blocks) != 1:
            raise ValueError(f"--blocks for {self.name} takes one number: the joint blocks")
        dual = tuple(i for i in self.config["dual_attention_layers"] if i < blocks[0])
        return {"num_layers": blocks[0], "dual_attention_layers": dual}

    def build(self, blocks: Sequence[int] | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
        torch.manual_seed(0)
        cls = FluxTransformer2DModel if self.kind == "flux" else SD3Transformer2DModel
        model = cls(**{**self.config, **self.depth(blocks)})
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def joint_layers(self, blocks: Sequence[int] | None) -> int:
        """Joint attention layers at this depth (every FLUX block; SD3's blocks, not their attn2)."""
        cfg = {**self.config, **self.depth(blocks)}
        return cfg["num_layers"] + cfg.get("num_single_layers", 0)

    def image_tokens(self, resolution: int) -> int:
        side = resolution // VAE_FACTOR // 2  # both models attend over 2x2 latent patches
        return side * side

    def text(self, resolution: int) -> tuple[int, int]:
        """The text block of the joint sequence: first in FLUX, last in diffusers' SD3."""
        start = 0 if self.kind == "flux" else self.image_tokens(resolution)
        return start, self.text_tokens

    def inputs(self, model: nn.Module, resolution: int, batch: int) -> tuple[dict[str, Tensor], str]:
        """Random model inputs of the pipeline's shapes, and the name of the latent input."""
        g = torch.Generator().manual_seed(0)
        p = next(model.parameters())
        cfg = model.config

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

        common = {
            "encoder_hidden_states": randn(batch, self.text_tokens, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim),
        }
        side = resolution // VAE_FACTOR
        if self.kind == "sd3":
            t = torch.full((batch,), 500.0, device=p.device, dtype=p.dtype)
            latent = randn(batch, cfg.in_channels, side, side)
            return {**common, "hidden_states": latent, "timestep": t}, "hidden_states"
        rows, cols = torch.meshgrid(torch.arange(side // 2), torch.arange(side // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        extra = {
            "hidden_states": randn(batch, (side // 2) ** 2, cfg.in_channels),
            "timestep": torch.full((batch,), 0.5, device=p.device, dtype=p.dtype),  # FluxPipeline: t / 1000
            "img_ids": img_ids.to(device=p.device, dtype=p.dtype),
            "txt_ids": torch.zeros(self.text_tokens, 3, device=p.device, dtype=p.dtype),  # as FluxPipeline
            "guidance": torch.full((batch,), 3.5, device=p.device, dtype=torch.float32),
        }
        return {**common, **extra}, "hidden_states"


def _tiny(kind: str) -> dict[str, Any]:
    """Same architecture, widths cut so the smoke run takes seconds."""
    if kind == "flux":
        narrow = {"attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": (4, 4, 8)}
        return {**FLUX_DEV, **narrow, "joint_attention_dim": 32}
    return {**SD35_MEDIUM, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32}


MODELS = {
    "flux-dev": MMDiTSpec("flux-dev", "flux", FLUX_DEV, 512),
    "sd35-medium": MMDiTSpec("sd35-medium", "sd3", SD35_MEDIUM, 333),
}
SMOKE_MODELS = {
    "tiny-flux": MMDiTSpec("tiny-flux", "flux", {**_tiny("flux"), "pooled_projection_dim": 8}, 7),
    "tiny-sd3": MMDiTSpec(
        "tiny-sd3", "sd3", {**_tiny("sd3"), "caption_projection_dim": 16, "pooled_projection_dim": 8}, 7
    ),
}
ALL_MODELS = {**MODELS, **SMOKE_MODELS}
PEERS = ("floor", "ours", "ours_torch", "eager")


# ------------------------------------------------------------------------------------------- peers


def eager_joint(
    query: Tensor, key: Tensor, value: Tensor, text: tuple[int, int], scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Joint attention with the ``(B, H, L, L)`` softmax materialized: output and the float32 image x
    text block of it (what hand-written hooks compute)."""
    scale = scale or query.shape[-1] ** -0.5
    probs = torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1)
    start, n_text = text
    block = probs[..., start : start + n_text]  # text columns first: the row join copies only those
    rows = [block[:, :, :start], block[:, :, start + n_text :]]
    maps = torch.cat(rows, dim=2) if start else rows[1]
    return probs @ value, maps.float()


class EagerJointMaps:
    """The hand-written way to get joint maps: every SDPA call inside the model's joint layers becomes an
    explicit softmax (``(B, H, L, L)``, kept by autograd), the image x text block is sliced out of it.

    Same ``record``/``guide``/``maps``/``loss`` surface as :class:`~dreamblend.AttentionStore`.
    """

    def __init__(self, model: nn.Module, text: tuple[int, int]) -> None:
        self.text = text
        self.mode = "off"
        self.maps: dict[str, Tensor] = {}
        self.losses: dict[str, Tensor] = {}
        self._ref: dict[str, Tensor] = {}
        self._layer: str | None = None
        self._hooks = [
            module.register_forward_pre_hook(
                partial(self._enter, name if is_joint_attention(module) else None)
            )
            for name, module in model.named_modules()
            if is_attention(module)
        ]

    def _enter(self, name: str | None, *_: object) -> None:
        self._layer = name

    @property
    def loss(self) -> Tensor:
        return torch.stack(list(self.losses.values())).sum(0)

    @contextmanager
    def record(self) -> Iterator[EagerJointMaps]:
        with self._active("record"):
            yield self

    @contextmanager
    def guide(self, ref: dict[str, Tensor]) -> Iterator[EagerJointMaps]:
        self._ref, self.losses = ref, {}
        with self._active("guide"):
            yield self

    @contextmanager
    def _active(self, mode: str) -> Iterator[None]:
        real = F.scaled_dot_product_attention
        self.mode = mode
        F.scaled_dot_product_attention = partial(self._attention, real)
        try:
            yield
        finally:
            F.scaled_dot_product_attention, self.mode = real, "off"

    def _attention(
        self, real: Callable, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs
    ) -> Tensor:
        if self._layer is None:  # SD3.5's image-only attn2: not a joint layer
            return real(query, key, value, *args, **kwargs)
        out, maps = eager_joint(query, key, value, self.text, kwargs.get("scale"))
        if self.mode == "record":
            self.maps[self._layer] = maps.detach()
        else:
            self.losses[self._layer] = l1_map_loss(maps, self._ref[self._layer], head_mean=False)
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


class ZeroWeightedOutputs:
    """The floor's stand-in for maps: a zero-weighted sum of every joint layer's attention output as
    the "loss", so the stock forward and an input-gradient backward through every joint layer run as
    in a guided step (DESIGN §6's guided floor), with no map, softmax or L1 of any kind."""

    def __init__(self, model: nn.Module) -> None:
        self.maps: dict[str, Tensor] = {}
        self._outputs: list[Tensor] | None = None
        self._hooks = [m.register_forward_hook(self._keep) for m in model.modules() if is_joint_attention(m)]

    def _keep(self, module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> None:
        if self._outputs is not None:
            self._outputs += output if isinstance(output, tuple) else [output]

    @property
    def loss(self) -> Tensor:
        return sum((o.float() * 0).sum() for o in self._outputs or ())

    @contextmanager
    def guide(self, ref: dict[str, Tensor]) -> Iterator[ZeroWeightedOutputs]:
        self._outputs = []
        try:
            yield self
        finally:
            self._outputs = None

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@contextmanager
def peer_maps(peer: str, model: nn.Module, text: tuple[int, int]) -> Iterator[Any]:
    """What records and guides for ``peer`` while the block runs."""
    if peer in ("floor", "eager"):
        maps = ZeroWeightedOutputs(model) if peer == "floor" else EagerJointMaps(model, text)
        try:
            yield maps
        finally:
            maps.close()
    else:
        with attach(model, AttentionStore(backend="torch" if peer == "ours_torch" else "auto")) as store:
            yield store


# ------------------------------------------------------------------------------------------- workloads


def guided_step(
    spec: MMDiTSpec, model: nn.Module, peer: str, args: argparse.Namespace
) -> Callable[[], Tensor]:
    """E's guided inner step for ``peer`` (reference maps recorded first, untimed)."""
    inputs, latent_name = spec.inputs(model, args.resolution, args.batch)
    stack = peer_maps(peer, model, spec.text(args.resolution))
    maps = stack.__enter__()
    ref = {}
    if peer != "floor":
        with torch.no_grad(), maps.record():
            model(**inputs, return_dict=False)
        ref = {name: m * 0.9 for name, m in maps.maps.items()}  # a reference the maps are off from

    def step() -> Tensor:
        latent = inputs[latent_name].detach().requires_grad_()
        with maps.guide(ref):
            model(**{**inputs, latent_name: latent}, return_dict=False)
            loss = maps.loss.sum()
        (grad,) = torch.autograd.grad(loss, latent)
        return grad

    step.close = partial(stack.__exit__, None, None, None)  # type: ignore[attr-defined]
    return step


def layer_step(spec: MMDiTSpec, peer: str, args: argparse.Namespace) -> Callable[[], object]:
    """One joint layer's guided op, fwd + bwd in q, k, v, at the model's layer shape."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    heads, head_dim = spec.config["num_attention_heads"], spec.config["attention_head_dim"]
    text = spec.text(args.resolution)
    length = spec.image_tokens(args.resolution) + text[1]
    g = torch.Generator().manual_seed(0)
    # (B, L, H, D) memory seen as (B, H, L, D), as the processors hand q, k, v over
    q, k, v, d_out = (
        torch.randn(args.batch, length, heads, head_dim, generator=g).to(device, dtype).transpose(1, 2)
        for _ in range(4)
    )
    ref = torch.rand(ops.joint.joint_map_shape(q, text), generator=g).to(device) / text[1]

    def step() -> object:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if peer == "floor":
            out, loss = F.scaled_dot_product_attention(*leaves), None
        elif peer == "eager":
            out, maps = eager_joint(*leaves, text)
            loss = l1_map_loss(maps, ref, head_mean=False)
        else:
            backend = "torch" if peer == "ours_torch" else "auto"
            out, loss = ops.joint_guided_attention(*leaves, ref, text=text, backend=backend)
        total = (out * d_out).sum() + (0 if loss is None else loss.sum())
        return torch.autograd.grad(total, leaves)

    return step


# ------------------------------------------------------------------------------------------- measuring


def computed_memory(spec: MMDiTSpec, args: argparse.Namespace) -> dict[str, int]:
    """Bytes an eager map needs against ours, per joint layer and over the model's joint layers.

    eager: the ``(B, H, L, L)`` probabilities of every joint layer, kept for the backward (dtype of
    the run); ours: the float32 reference maps ``(B, H, M_img, T)`` the guided step reads."""
    heads = spec.config["num_attention_heads"]
    m_img = spec.image_tokens(args.resolution)
    length = m_img + spec.text_tokens
    layers = spec.joint_layers(args.blocks) if args.workload == "step" else 1
    eager = args.batch * heads * length * length * DTYPES[args.dtype].itemsize
    ours = args.batch * heads * m_img * spec.text_tokens * 4
    return {
        "joint_layers": layers,
        "eager_map_bytes_per_layer": eager,
        "eager_map_bytes": eager * layers,
        "ours_ref_map_bytes_per_layer": ours,
        "ours_ref_map_bytes": ours * layers,
    }


def measure(spec: MMDiTSpec, peer: str, args: argparse.Namespace) -> dict[str, Any]:
    """Timing and peak memory of one configuration (model built here)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = None
    if args.workload == "step":
        model = spec.build(args.blocks, DTYPES[args.dtype], device)
        step = guided_step(spec, model, peer, args)
    else:
        step = layer_step(spec, peer, args)
    track_rss = not cuda and args.worker and reset_peak_rss()
    static = (proc_status_bytes("VmRSS") or 0) if track_rss else 0
    if cuda:
        static = torch.cuda.memory_allocated(device)
    try:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        timing = summarize(time_ms(step, args.repeats, device), args.warmup, device)
    finally:
        getattr(step, "close", lambda: None)()
    memory = None
    if cuda:
        memory = {"peak_bytes": torch.cuda.max_memory_allocated(device), "source": "cuda_allocator"}
    elif track_rss:
        memory = {"peak_bytes": proc_status_bytes("VmHWM"), "source": "peak_rss"}
    if memory is not None:
        memory["static_bytes"] = static
        memory["weight_bytes"] = 0 if model is None else sum(p.nbytes for p in model.parameters())
    return {"status": "ok", "error": None, "timing": timing, "memory": memory}


_WORKER_RESULT = "mmdit-worker-result: "


def isolated(args: argparse.Namespace, model: str, peer: str) -> dict[str, Any]:
    """One configuration's fields from a fresh ``--worker`` process (its own peak RSS)."""
    argv = [sys.executable, "-m", "benchmarks.mmdit", "--worker", "--models", model, "--peers", peer]
    argv += ["--workload", args.workload, "--resolution", str(args.resolution), "--batch", str(args.batch)]
    argv += ["--dtype", args.dtype, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    argv += ["--device", args.device, "--threads", str(torch.get_num_threads()), "--out", os.devnull]
    if args.blocks is not None:
        argv += ["--blocks", *map(str, args.blocks)]
    env = {**os.environ, "BENCH_GIT_REVISION": git_revision()}
    result = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_WORKER_RESULT)]
    if result.returncode != 0 or not lines:
        status = "oom" if result.returncode == -9 else "error"  # SIGKILL: the kernel's OOM killer
        return not_measured(status, f"worker process exited with status {result.returncode}")
    return json.loads(lines[-1][len(_WORKER_RESULT) :])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.mmdit", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths, one repeat: checks code paths")
    parser.add_argument("--models", nargs="+", choices=sorted(ALL_MODELS))
    parser.add_argument(
        "--peers", nargs="+", choices=PEERS, help="default: all (ours_torch only if auto differs)"
    )
    parser.add_argument(
        "--blocks",
        nargs="+",
        type=int,
        help="truncate at full width: DOUBLE SINGLE for FLUX, LAYERS for SD3 (default: full depth)",
    )
    parser.add_argument("--workload", choices=["step", "layer"], default="step")
    parser.add_argument("--resolution", type=int, help="pixels (default 1024; --smoke 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every peer this often, order reversed each round"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5; --smoke 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; --smoke: 1)")
    parser.add_argument(
        "--out", type=Path, help=f"JSONL to append to (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        help="one process per configuration, recording peak RSS (default: on CPU outside --smoke)",
    )
    parser.add_argument(
        "--fail-fast", action="store_true", help="raise the first error instead of recording it"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.models or (list(SMOKE_MODELS) if args.smoke else list(MODELS))
    if args.resolution is None:
        args.resolution = 64 if args.smoke else 1024
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    if args.threads is None and args.smoke:
        args.threads = 1
    if args.out is None:
        tmp = Path(tempfile.gettempdir()) / f"dreamblend-mmdit-smoke-{os.getpid()}.jsonl"
        args.out = tmp if args.smoke else DEFAULT_OUT
    if args.isolate is None:
        args.isolate = torch.device(args.device).type == "cpu" and not args.smoke
    if args.resolution % (2 * VAE_FACTOR):
        parser.error(f"--resolution must be a multiple of {2 * VAE_FACTOR} (2x2 patches of 8x latents)")
    if min(args.batch, args.repeats, args.rounds, *(args.blocks or [1])) < 1 or args.warmup < 0:
        parser.error("--batch, --repeats, --rounds and --blocks must be positive, --warmup >= 0")
    for name in args.models:
        try:
            ALL_MODELS[name].depth(args.blocks)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def peers_for(args: argparse.Namespace) -> list[str]:
    """The named peers, or all of them with ``ours_torch`` only where ``auto`` is something else."""
    if args.peers:
        return args.peers
    auto = ops.resolved_backend_name("auto", torch.device(args.device))
    return [p for p in PEERS if p != "ours_torch" or auto != "torch"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every model x peer; exit status 1 if any configuration failed with an error (OOM is a result)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        spec, peer = ALL_MODELS[args.models[0]], args.peers[0]
        fields = guarded(partial(measure, spec, peer, args), args.fail_fast)
        print(_WORKER_RESULT + json.dumps(fields), flush=True)
        return 0
    device = torch.device(args.device)
    shared = environment(device, args.smoke)
    shared["versions"]["cpp_extension"] = "cpp" in ops.available_backends()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    errors = 0
    print(f"appending to {args.out}", flush=True)
    for name in args.models:
        spec = ALL_MODELS[name]
        peers = peers_for(args)
        # Rounds alternate the peer order (A B C, C B A, ...): on a shared machine the load drifts
        # over minutes, and one fixed order would credit that drift to whichever peer runs last.
        schedule = [(r, p) for r in range(args.rounds) for p in (peers if r % 2 == 0 else peers[::-1])]
        for round_index, peer in schedule:
            if args.isolate:
                fields = isolated(args, name, peer)
            else:
                fields = guarded(partial(measure, spec, peer, args), args.fail_fast)
                release(device)
            backend = {"ours": ops.resolved_backend_name("auto", device), "ours_torch": "torch"}.get(peer)
            record = {
                **shared,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": name,
                "workload": args.workload,
                "blocks": args.blocks,
                "truncated": args.workload == "step" and bool(spec.depth(args.blocks)),
                "resolution": args.resolution,
                "image_tokens": spec.image_tokens(args.resolution),
                "text": list(spec.text(args.resolution)),
                "heads": spec.config["num_attention_heads"],
                "head_dim": spec.config["attention_head_dim"],
                "dtype": args.dtype,
                "batch": args.batch,
                "peer": peer,
                "round": round_index,
                "backend": backend,
                "maps": "per-head, all text tokens",
                "computed": computed_memory(spec, args),
                **fields,
            }
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            errors += record["status"] == "error"
            print(describe(record), flush=True)
    return int(errors > 0)


def describe(record: dict[str, Any]) -> str:
    """One progress line per record."""
    where = f"{record['model']} {record['workload']} blocks={record['blocks']} {record['resolution']}px "
    where += f"{record['dtype']} b{record['batch']} {record['peer']}"
    if record["status"] != "ok":
        return f"{where}: {record['status']} ({record['error']})"
    t, memory = record["timing"], record["memory"]
    text = f"{where}: {t['median_ms']:.1f} ms [{t['min_ms']:.1f}, {t['max_ms']:.1f}]"
    if memory:
        text += f", peak {memory['peak_bytes'] / 2**30:.2f} GiB ({memory['source']})"
    return text


if __name__ == "__main__":
    sys.exit(main())
