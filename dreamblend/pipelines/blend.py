"""What both DreamBlend pipelines share: model pairing, validation, the guided step and inversion.

The pipelines (:mod:`.pipeline_dreamblend`, :mod:`.pipeline_dreamblend_xl`) keep the readable
denoising loop and their model-specific conditioning; everything that does not depend on the model
family lives here so the two stay short.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import BaseOutput
from torch import Tensor

from dreamblend.checkpoints import load_unet
from dreamblend.custom_diffusion import attach_dreamblend
from dreamblend.store import AttentionStore, LayerSpec
from dreamblend.tokens import TokenSelection

AdapterSpec = str | Sequence[str] | Mapping[str, float] | None
GuidanceSteps = tuple[float, float] | Sequence[int] | None
AttentionCallback = Callable[[str, int, dict[str, Tensor]], None]
SCHEDULES = ("lockstep", "two_phase")
ROLES = ("guidance", "edit")
# Paper defaults (DDIM 50, SD1.5): alpha 0.1 (with CFG 3.0) for the step-100 edit checkpoint, 0.07 (CFG 2.0)
# for step 200. v-prediction models produce about 10x larger gradients.
DEFAULT_ALPHA = {"epsilon": 0.1, "v_prediction": 0.01}


@dataclass
class DreamBlendPipelineOutput(BaseOutput):
    """Images of the edit model E and, with ``return_reference=True``, the guidance model G's reference.

    ``nsfw_content_detected`` is filled only by pipelines with a safety checker.
    """

    images: list[PIL.Image.Image] | np.ndarray | Tensor
    reference_images: list[PIL.Image.Image] | np.ndarray | Tensor | None = None
    nsfw_content_detected: list[bool] | None = None


# ---------------------------------------------------------------------------------------------- validation


def resolve_alpha(alpha: float | None, prediction_type: str) -> float:
    """The cross-attention guidance scale, defaulting by prediction type; rejects unusable values."""
    if alpha is None:
        return DEFAULT_ALPHA.get(prediction_type, DEFAULT_ALPHA["epsilon"])
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise ValueError(
            f"cross_attention_guidance_scale (alpha) must be a finite number >= 0, got {alpha!r}; "
            "use 0 to turn guidance off, ~0.1 for epsilon models, ~0.01 for v-prediction models"
        )
    return float(alpha)


def resolve_guided_steps(spec: GuidanceSteps, num_steps: int) -> frozenset[int]:
    """Indices of the denoising steps that get a guidance update.

    ``None`` guides every step; a pair containing a float is a fraction range ``[start, end)`` of the
    steps (``(0.0, 0.5)``: the first half); a sequence of ints lists step indices (negatives count
    from the end).
    """
    if spec is None:
        return frozenset(range(num_steps))
    items = tuple(spec)
    if len(items) == 2 and any(isinstance(x, float) for x in items):
        start, end = (float(x) for x in items)
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"guidance_steps fraction range must satisfy 0 <= start <= end <= 1, got {spec!r}; "
                "e.g. (0.0, 0.5) guides the first half of the steps"
            )
        return frozenset(i for i in range(num_steps) if start <= i / num_steps < end)
    if not items or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in items):
        raise TypeError(
            "guidance_steps must be a (start, end) fraction pair of floats or a list of step indices, "
            f"got {spec!r}"
        )
    bad = [int(i) for i in items if not -num_steps <= i < num_steps]
    if bad:
        raise ValueError(f"guidance_steps indices {bad} are out of range for {num_steps} denoising steps")
    return frozenset(int(i) % num_steps for i in items)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {SCHEDULES}, got {schedule!r}: 'lockstep' keeps one step of reference "
            "maps in memory, 'two_phase' runs all of G first as in the paper (same images)"
        )


def _plain(value: Any) -> Any:
    """Config values with tuples as lists, so a loaded config compares equal to a constructed one."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_same_architecture(guidance: torch.nn.Module, edit: torch.nn.Module, noun: str = "UNet") -> None:
    """G and E must be checkpoints of one base model: same model class and config (``noun``: its kind)."""
    if type(guidance) is not type(edit):
        raise ValueError(
            f"guidance model is a {type(guidance).__name__} but the edit model is a {type(edit).__name__}; "
            "G and E must be checkpoints of the same base model"
        )
    g = {k: _plain(v) for k, v in guidance.config.items() if not k.startswith("_")}
    e = {k: _plain(v) for k, v in edit.config.items() if not k.startswith("_")}
    diff = sorted(k for k in g.keys() | e.keys() if g.get(k) != e.get(k))
    if diff:
        details = ", ".join(f"{k} (G {g.get(k)!r}, E {e.get(k)!r})" for k in diff[:6])
        raise ValueError(
            f"the guidance and edit {noun}s have different architectures: {details}; G and E must be "
            f"fine-tuning checkpoints of the same base model (same {noun} config), sharing its VAE and text "
            "encoder"
        )


def check_fits_pipeline(
    unet: torch.nn.Module, role: str, text_width: int | None, latent_channels: int, noun: str = "UNet"
) -> None:
    """The model must accept the pipeline's text embeddings and latents (``noun``: its kind)."""
    config = unet.config
    if text_width is not None and config.cross_attention_dim != text_width:
        raise ValueError(
            f"the {role} {noun} expects text embeddings of width {config.cross_attention_dim}, but the "
            f"pipeline's text encoder produces {text_width}; use a checkpoint of the pipeline's base model"
        )
    if config.in_channels != latent_channels:
        raise ValueError(
            f"the {role} {noun} takes {config.in_channels} input channels, but the pipeline's VAE makes "
            f"{latent_channels}-channel latents; use a text-to-image checkpoint of the pipeline's base model"
        )


def _same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same object, or same class with identical weights."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k])) for k in sa
    )


def check_shares_components(pipe: Any, other: Any) -> None:
    """G's pipeline must use this pipeline's VAE, text encoders and tokenizers (only its UNet is taken)."""
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        mine, theirs = getattr(pipe, name, None), getattr(other, name, None)
        if mine is None or theirs is None:
            continue
        if name.startswith("tokenizer"):
            same = mine is theirs or mine.get_vocab() == theirs.get_vocab()
        else:
            same = _same_module(mine, theirs)
        if not same:
            raise ValueError(
                f"the guidance pipeline's {name} differs from this pipeline's; G and E share the VAE, text "
                "encoder and tokenizer, so only checkpoints that fine-tuned the UNet (or transformer) alone "
                "can be paired "
                "(pass the guidance pipeline's unet only if that is what you intend)"
            )


# ---------------------------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Adapters:
    """One role's LoRA setting on a shared UNet: ``names=()`` disables adapters (the base model)."""

    names: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, spec: AdapterSpec) -> Adapters | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            return cls((spec,))
        if isinstance(spec, Mapping):
            return cls(tuple(spec), tuple(float(w) for w in spec.values()))
        return cls(tuple(spec))


ENABLED = Adapters(("<enabled>",))  # the adapters active when the call started, untouched
DISABLED = Adapters(())


def _tuner_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _loaded_adapters(unet: torch.nn.Module) -> list[str]:
    return list(getattr(unet, "peft_config", None) or {})


class ModelPair:
    """The guidance model G and the edit model E: two UNets, or one UNet with two adapter settings.

    :meth:`use` returns the UNet for a role with that role's adapters active; :meth:`session` freezes
    the UNets' parameters (only the latent needs a gradient) and restores adapter state on exit.
    ``noun`` and ``guidance_argument`` name the model kind and the pipeline argument in error messages
    (a subclass pairs transformers).
    """

    noun = "UNet"
    guidance_argument = "guidance_unet"

    def __init__(
        self,
        guidance: UNet2DConditionModel,
        edit: UNet2DConditionModel,
        guidance_adapters: Adapters | None = None,
        edit_adapters: Adapters | None = None,
    ) -> None:
        self.unets = {"guidance": guidance, "edit": edit}
        self.adapters = {"guidance": guidance_adapters, "edit": edit_adapters}
        self._current: dict[int, Adapters | None] = {}

    @classmethod
    def resolve(
        cls,
        unet: UNet2DConditionModel,
        guidance_unet: UNet2DConditionModel | None,
        guidance_adapter: AdapterSpec = None,
        edit_adapter: AdapterSpec = None,
        *,
        text_width: int | None,
        latent_channels: int,
    ) -> ModelPair:
        """Pair E (``unet``) with G (``guidance_unet``, or ``unet`` under other adapters) and validate."""
        g_adapters, e_adapters = Adapters.parse(guidance_adapter), Adapters.parse(edit_adapter)
        guidance = unet if guidance_unet is None else guidance_unet
        if guidance is unet:
            if not _loaded_adapters(unet):
                raise ValueError(
                    "DreamBlend needs a guidance model G besides the edit model E: pass an earlier "
                    f"checkpoint as {cls.guidance_argument}=, or LoRA adapters for the roles "
                    "(pipe.load_lora_weights(path, adapter_name=...) with guidance_adapter=/edit_adapter=)"
                )
            # On one UNet G defaults to the base model (adapters off), E to the adapters active now.
            if g_adapters is None:
                g_adapters = DISABLED
            if e_adapters is None:
                e_adapters = ENABLED if g_adapters == DISABLED else Adapters(tuple(unet.active_adapters()))
            if g_adapters == e_adapters:
                raise ValueError(
                    f"guidance and edit resolve to the same model (adapters {list(g_adapters.names)}); "
                    "pass different guidance_adapter= and edit_adapter=, or a separate "
                    f"{cls.guidance_argument}="
                )
        else:
            check_same_architecture(guidance, unet, cls.noun)
            if guidance.device != unet.device:
                raise ValueError(
                    f"the guidance {cls.noun} is on {guidance.device} but the edit {cls.noun} on "
                    f"{unet.device}; "
                    "move the pipeline with pipe.to(device) so both share one device"
                )
        for role, model, adapters in (("guidance", guidance, g_adapters), ("edit", unet, e_adapters)):
            check_fits_pipeline(model, role, text_width, latent_channels, cls.noun)
            cls._check_adapters(model, role, adapters)
        return cls(guidance, unet, g_adapters, e_adapters)

    @classmethod
    def _check_adapters(cls, unet: torch.nn.Module, role: str, adapters: Adapters | None) -> None:
        if adapters is None or adapters in (ENABLED, DISABLED):
            return
        loaded = _loaded_adapters(unet)
        if not loaded:
            raise ValueError(
                f"{role}_adapter={list(adapters.names)} but the {role} {cls.noun} has no LoRA adapters "
                "loaded; "
                f"load one with pipe.load_lora_weights(path, adapter_name={adapters.names[0]!r})"
            )
        unknown = [name for name in adapters.names if name not in loaded]
        if unknown:
            raise ValueError(
                f"unknown {role} adapter(s) {unknown}; the {role} {cls.noun} has {loaded}. Load it with "
                f"pipe.load_lora_weights(path, adapter_name={unknown[0]!r}) or pick one of the loaded names"
            )

    def distinct_unets(self) -> list[UNet2DConditionModel]:
        return list({id(u): u for u in self.unets.values()}.values())

    def use(self, role: str) -> UNet2DConditionModel:
        """The UNet for ``role`` ("guidance" or "edit"), with that role's adapters switched on."""
        if role not in ROLES:
            raise ValueError(f"model role must be one of {ROLES}, got {role!r}")
        unet, adapters = self.unets[role], self.adapters[role]
        if adapters is not None and self._current.get(id(unet)) != adapters:
            if adapters == DISABLED:
                unet.disable_adapters()
            else:
                unet.enable_adapters()
                if adapters != ENABLED:
                    weights = list(adapters.weights) if adapters.weights is not None else None
                    unet.set_adapters(list(adapters.names), weights)
            self._current[id(unet)] = adapters
        return unet

    @contextmanager
    def session(self) -> Iterator[ModelPair]:
        """Freeze UNet parameters and restore each UNet's adapter state (names and on/off) on exit."""
        saved = []
        for unet in self.distinct_unets():
            params = [p for p in unet.parameters() if p.requires_grad]
            layers = _tuner_layers(unet) if _loaded_adapters(unet) else []
            enabled = any(not layer.disable_adapters for layer in layers)
            active = list(unet.active_adapters()) if layers else []
            saved.append((unet, params, layers, enabled, active))
        sets_names = any(a not in (None, ENABLED, DISABLED) for a in self.adapters.values())
        try:
            for _, params, *_ in saved:
                for p in params:
                    p.requires_grad_(False)
            yield self
        finally:
            self._current.clear()
            for unet, params, layers, enabled, active in saved:
                for p in params:
                    p.requires_grad_(True)
                if not layers:
                    continue
                if sets_names:
                    unet.set_adapters(active)  # note: resets adapter weights to 1.0
                (unet.enable_adapters if enabled else unet.disable_adapters)()


# ---------------------------------------------------------------------------------------------- sampling


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in ``value`` (a tensor or nested dicts of them)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


@dataclass
class Conditioning:
    """UNet inputs for one batch of prompts, laid out as the CFG batch ``[uncond; cond]`` when CFG is on.

    ``kwargs`` holds the model family's extra UNet inputs (SDXL's ``added_cond_kwargs``) in the same
    batch layout.
    """

    embeds: Tensor
    guidance_scale: float
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def cond_rows(self) -> slice | None:
        """Rows of the conditional branch in the model batch (None: the whole batch)."""
        if not self.do_cfg:
            return None
        half = self.embeds.shape[0] // 2
        return slice(half, 2 * half)

    def inputs(self, dtype: torch.dtype, conditional_only: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """Embeddings and kwargs in a UNet's dtype (G's and E's may differ), optionally only the cond rows."""
        rows = self.cond_rows if conditional_only else None
        batch = self.embeds.shape[0]

        def prepare(t: Tensor) -> Tensor:
            if rows is not None and t.dim() > 0 and t.shape[0] == batch:
                t = t[rows]
            return t.to(dtype) if t.is_floating_point() else t

        return prepare(self.embeds), _map_tensors(self.kwargs, prepare)


def cfg_step(
    unet: UNet2DConditionModel,
    scheduler: Any,
    latents: Tensor,
    t: Tensor,
    cond: Conditioning,
    step_kwargs: Mapping[str, Any],
    store: AttentionStore | None = None,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """One classifier-free-guided denoising step; with ``store``, also the conditional branch's maps."""
    dtype = unet.dtype  # diffusers walks every module for it: once per step, not per tensor
    model_input = torch.cat([latents] * 2) if cond.do_cfg else latents
    model_input = scheduler.scale_model_input(model_input, t).to(dtype)
    embeds, kwargs = cond.inputs(dtype)
    recording = store.record(rows=cond.cond_rows) if store is not None else nullcontext()
    with recording:
        noise = unet(model_input, t, encoder_hidden_states=embeds, **kwargs, return_dict=False)[0]
    if cond.do_cfg:
        uncond, text = noise.chunk(2)
        noise = uncond + cond.guidance_scale * (text - uncond)
    latents = scheduler.step(noise.to(latents.dtype), t, latents, **step_kwargs, return_dict=False)[0]
    return latents, (store.maps if store is not None else None)


def fork_generator(generator: torch.Generator | list[torch.Generator] | None) -> Any:
    """An independent copy of ``generator`` so G and E draw the same noise whatever their interleaving."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [fork_generator(g) for g in generator]
    fork = torch.Generator(device=generator.device)
    fork.set_state(generator.get_state())
    return fork


class DreamBlendSampler:
    """G's and E's trajectories from one start latent (DESIGN §2), stepped by a pipeline's loop.

    ``cond`` conditions E, ``guidance_cond`` G (the same unless G encodes its prompt with its own
    learned token vectors, see :mod:`dreamblend.tokens`).

    G and E get separate scheduler instances (multistep schedulers keep history) and separate copies
    of the generator, so ``lockstep`` and ``two_phase`` give identical images.

    ``install(model, store)`` is the context manager that puts the capture/guide processors on a model
    for the session (a subclass installs the MMDiT ones).

    ``attention_callback(role, i, maps)`` receives the conditional branch's maps of every CFG step of
    G ("guidance") and E ("edit"); G then runs every step. Recording routes those steps' attention
    through the capture op, which equals plain attention within float tolerance.
    """

    install: Callable[[torch.nn.Module, AttentionStore], AbstractContextManager] = staticmethod(
        attach_dreamblend
    )

    def __init__(
        self,
        pair: ModelPair,
        store: AttentionStore,
        cond: Conditioning,
        scheduler: Any,
        *,
        guidance_cond: Conditioning | None = None,
        alpha: float,
        guided_steps: frozenset[int],
        num_steps: int,
        return_reference: bool,
        edit_step_kwargs: Mapping[str, Any],
        guidance_step_kwargs: Mapping[str, Any],
        attention_callback: AttentionCallback | None = None,
    ) -> None:
        self.pair, self.store, self.cond, self.alpha = pair, store, cond, alpha
        self.guidance_cond = cond if guidance_cond is None else guidance_cond
        self.guided_steps = guided_steps if alpha > 0 else frozenset()
        self.attention_callback = attention_callback
        # G runs only as far as E needs references, unless its image or maps are wanted too.
        full = return_reference or attention_callback is not None
        self.guidance_until = num_steps if full else max(self.guided_steps, default=-1) + 1
        self.edit_scheduler = scheduler
        self.guidance_scheduler = copy.deepcopy(scheduler)
        self.edit_step_kwargs = edit_step_kwargs
        self.guidance_step_kwargs = guidance_step_kwargs
        self._finite: list[tuple[int, Tensor]] = []

    @contextmanager
    def session(self) -> Iterator[DreamBlendSampler]:
        """Install DreamBlend processors on G and E and freeze them, restoring everything on exit."""
        with ExitStack() as stack:
            stack.enter_context(self.pair.session())
            for unet in self.pair.distinct_unets():
                stack.enter_context(self.install(unet, self.store))
            yield self

    def runs_guidance(self, i: int) -> bool:
        return i < self.guidance_until

    def guidance_step(self, i: int, t: Tensor, latents: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
        """G's CFG step; at guided steps its conditional maps come back as E's reference."""
        unet = self.pair.use("guidance")
        guided = i in self.guided_steps
        store = self.store if guided or self.attention_callback is not None else None
        latents, maps = cfg_step(
            unet, self.guidance_scheduler, latents, t, self.guidance_cond, self.guidance_step_kwargs, store
        )
        self._observe("guidance", i, maps)
        return latents, maps if guided else None

    def edit_step(self, i: int, t: Tensor, latents: Tensor, ref: Mapping[str, Tensor] | None) -> Tensor:
        """E's step: the guidance update toward ``ref`` (if any), then E's CFG step at the new latent."""
        unet = self.pair.use("edit")
        if ref is not None:
            latents = self.guided_update(i, unet, latents, t, ref)
        store = self.store if self.attention_callback is not None else None
        latents, maps = cfg_step(
            unet, self.edit_scheduler, latents, t, self.cond, self.edit_step_kwargs, store
        )
        self._observe("edit", i, maps)
        return latents

    def _observe(self, role: str, i: int, maps: dict[str, Tensor] | None) -> None:
        if self.attention_callback is not None and maps is not None:
            self.attention_callback(role, i, maps)

    def guided_update(
        self, i: int, unet: UNet2DConditionModel, latents: Tensor, t: Tensor, ref: Mapping[str, Tensor]
    ) -> Tensor:
        """``l <- l - alpha * grad_l sum_b L_b(l)`` on E's conditional branch, in float32.

        Summing over the batch keeps each image's update independent of the batch size. A sample whose
        loss or update is not finite keeps its latent; the check is a device-side mask, reported in
        :meth:`finish` so the loop never waits on the host.
        """
        dtype = unet.dtype
        embeds, kwargs = self.cond.inputs(dtype, conditional_only=True)
        with torch.enable_grad():
            x = latents.detach().to(torch.float32).requires_grad_(True)
            model_input = self.edit_scheduler.scale_model_input(x, t).to(dtype)
            with self.store.guide(ref):
                # Only the loss is used: E's forward ends after the last guided layer.
                self.store.run_for_loss(
                    unet, model_input, t, encoder_hidden_states=embeds, **kwargs, return_dict=False
                )
                losses = self.store.loss
                (grad,) = torch.autograd.grad(losses.sum(), x)
        update = self.alpha * grad
        # A NaN reference can leave a finite (zero) gradient behind a NaN loss: check both.
        finite = torch.isfinite(update).flatten(1).all(dim=1) & torch.isfinite(losses.detach())
        self._finite.append((i, finite))
        x = x.detach()
        return torch.where(finite.view(-1, 1, 1, 1), x - update, x).to(latents.dtype)

    def finish(self) -> None:
        """Warn once about skipped (non-finite) guidance updates."""
        if not self._finite:
            return
        ok = torch.stack([f for _, f in self._finite]).cpu()
        bad = [(self._finite[r][0], int(b)) for r, b in (~ok).nonzero().tolist()]
        if bad:
            warnings.warn(
                f"skipped {len(bad)} non-finite cross-attention guidance update(s) (step, image): {bad[:8]}; "
                "those latents were left unchanged. Lower cross_attention_guidance_scale, run the guidance "
                "step in float32, or check the guidance model for NaN outputs",
                RuntimeWarning,
                stacklevel=3,
            )


def step_callback(
    pipe: Any, callback: Callable | None, tensor_inputs: Sequence[str], i: int, t: Tensor, latents: Tensor
) -> Tensor:
    """``callback_on_step_end`` with E's latents (the only callback tensor these pipelines expose)."""
    if callback is None:
        return latents
    outputs = callback(pipe, i, t, {name: latents for name in tensor_inputs})
    return outputs.pop("latents", latents)


# ---------------------------------------------------------------------------------------------- VAE


def _latent_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor] | None:
    config = vae.config
    if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
        return None
    channels = len(config.latents_mean)
    mean = torch.tensor(config.latents_mean).view(1, channels, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(config.latents_std).view(1, channels, 1, 1).to(like.device, like.dtype)
    return mean, std


@contextmanager
def _vae_in_float32(vae: Any, upcast: bool) -> Iterator[None]:
    """SDXL's VAE overflows in float16: run it in float32 for the call, then cast it back."""
    dtype = vae.dtype
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=dtype)


def vae_decode(vae: Any, latents: Tensor, upcast: bool = False) -> Tensor:
    """Pixels in [-1, 1] for model latents (undoing scaling, and SDXL's mean/std when configured)."""
    with _vae_in_float32(vae, upcast):
        stats = _latent_stats(vae, latents)
        if stats is None:
            latents = latents / vae.config.scaling_factor
        else:
            latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def vae_encode(vae: Any, pixels: Tensor, upcast: bool = False) -> Tensor:
    """Model latents (float32) for pixels in [-1, 1]: the posterior mean, so inversion is deterministic."""
    with _vae_in_float32(vae, upcast):
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float()
    stats = _latent_stats(vae, latents)
    if stats is None:
        return latents * vae.config.scaling_factor
    return (latents - stats[0]) * vae.config.scaling_factor / stats[1]


# ---------------------------------------------------------------------------------------------- mixin


class BlendLoop:
    """Algorithm 1's loop over a pipeline's timesteps, shared by the UNet and MMDiT pipelines.

    Hooks for a model family: ``sampler_class`` (its :attr:`DreamBlendSampler.install` puts that
    family's processors on G and E) and :meth:`_step_callback` (the latents callbacks see); a pipeline
    provides ``_decode(latents, output_type)`` for :meth:`_output`.
    """

    sampler_class: type[DreamBlendSampler] = DreamBlendSampler

    def _step_callback(
        self, callback: Callable | None, tensor_inputs: Sequence[str], i: int, t: Tensor, latents: Tensor
    ) -> Tensor:
        return step_callback(self, callback, tensor_inputs, i, t, latents)

    def _sample(
        self,
        pair: ModelPair,
        cond: Conditioning,
        store: AttentionStore,
        scheduler: Any,
        timesteps: Tensor,
        latents: Tensor,
        *,
        guidance_cond: Conditioning | None = None,
        alpha: float,
        guidance_steps: GuidanceSteps,
        schedule: str,
        return_reference: bool,
        edit_step_kwargs: Mapping[str, Any],
        guidance_step_kwargs: Mapping[str, Any],
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: Any,
        attention_callback: AttentionCallback | None = None,
    ) -> tuple[Tensor, Tensor]:
        """G and E through Algorithm 1 from the start latent ``latents`` (l_T) over ``timesteps``.

        Returns E's final latents and G's (G's stop advancing after the last guided step unless
        ``return_reference``).
        """
        self._num_timesteps = len(timesteps)
        sampler = self.sampler_class(
            pair,
            store,
            cond,
            scheduler,
            guidance_cond=guidance_cond,
            alpha=alpha,
            guided_steps=resolve_guided_steps(guidance_steps, len(timesteps)),
            num_steps=len(timesteps),
            return_reference=return_reference,
            edit_step_kwargs=edit_step_kwargs,
            guidance_step_kwargs=guidance_step_kwargs,
            attention_callback=attention_callback,
        )
        g_latents, refs = latents, {}
        phases = ("guidance", "edit") if schedule == "two_phase" else ("lockstep",)
        with sampler.session(), self.progress_bar(total=len(timesteps) * len(phases)) as progress_bar:
            for phase in phases:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    if phase != "edit" and sampler.runs_guidance(i):
                        # G: a plain step; at guided steps its conditional maps are E's reference
                        g_latents, refs[i] = sampler.guidance_step(i, t, g_latents)
                    if phase != "guidance":
                        # E: one gradient step toward G's maps, then its own step at the new latent
                        latents = sampler.edit_step(i, t, latents, refs.pop(i, None))
                        latents = self._step_callback(
                            callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents
                        )
                    progress_bar.update()
        sampler.finish()
        return latents, g_latents

    def _output(
        self, latents: Tensor, g_latents: Tensor, output_type: str, return_reference: bool, return_dict: bool
    ) -> DreamBlendPipelineOutput | tuple:
        """The call's result: E's images and, with ``return_reference``, G's (the pipeline's ``_decode``)."""
        images = self._decode(latents, output_type)
        reference = self._decode(g_latents, output_type) if return_reference else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, reference
        return DreamBlendPipelineOutput(images=images, reference_images=reference)


class DreamBlendMixin(BlendLoop):
    """Pairing and real-image inversion for DreamBlend pipelines.

    A pipeline provides ``_conditioning(...) -> Conditioning``, ``_text_width()`` and
    ``_vae_upcast()``; the rest (``unet``, ``guidance_unet``, ``vae``, ``scheduler``,
    ``image_processor``, ``progress_bar``) comes from diffusers.
    """

    def _model_pair(self, guidance_adapter: AdapterSpec, edit_adapter: AdapterSpec) -> ModelPair:
        return ModelPair.resolve(
            self.unet,
            self.guidance_unet,
            guidance_adapter,
            edit_adapter,
            text_width=self._text_width(),
            latent_channels=self.vae.config.latent_channels,
        )

    def _vae_upcast(self) -> bool:
        return False

    def _attention_store(
        self,
        prompt: str | Sequence[str] | None,
        tokens: TokenSelection | None,
        head_mean: bool,
        layers: LayerSpec | Sequence[LayerSpec] | None,
        backend: str,
    ) -> AttentionStore:
        """The call's store; words in ``attention_tokens`` become their positions in the prompt here."""
        store = AttentionStore(tokens, head_mean, layers, backend)
        if store.words is not None:
            if prompt is None:
                raise ValueError(
                    f"attention_tokens {list(store.words)} name words, but no prompt text was given "
                    "(prompt_embeds); pass the prompt, or token indices"
                )
            tokenizer = self.tokenizer if getattr(self, "tokenizer", None) is not None else self.tokenizer_2
            store.resolve_words(tokenizer, prompt)
        return store

    def _token_scope(self, embeddings: Mapping[str, Tensor] | None) -> AbstractContextManager:
        """Prompt encoding with ``embeddings`` in place of the text encoder's rows for those tokens."""
        if embeddings:
            raise ValueError(
                f"{type(self).__name__} does not take guidance_token_embeddings; they are supported by "
                "DreamBlendPipeline (one text encoder). Load the token into the pipeline for both roles"
            )
        return nullcontext()

    def _role_conditioning(
        self, guidance_token_embeddings: Mapping[str, Tensor] | None, **kwargs: Any
    ) -> tuple[Conditioning, Conditioning]:
        """E's and G's conditioning: one encoding unless G has its own learned token vectors."""
        edit = self._conditioning(**kwargs)
        if not guidance_token_embeddings:
            return edit, edit
        if kwargs.get("prompt_embeds") is not None:
            raise ValueError(
                "guidance_token_embeddings change how G's prompt is encoded, but prompt_embeds were given; "
                "pass the prompt as text, or leave guidance_token_embeddings out so G uses prompt_embeds too"
            )
        with self._token_scope(guidance_token_embeddings):
            return edit, self._conditioning(**kwargs)

    def _guidance_unet(self, spec: Any) -> UNet2DConditionModel | None:
        """The guidance UNet for ``guidance_unet=``: a UNet, a pipeline, a diffusers folder or a hub id.

        A pipeline must share this pipeline's VAE, text encoder(s) and tokenizer(s); a loaded folder
        follows the edit UNet's device and dtype.
        """
        if spec is None:
            return None
        if isinstance(spec, DiffusionPipeline):
            check_shares_components(self, spec)
        unet = load_unet(spec, torch_dtype=self.unet.dtype)
        if isinstance(spec, (str, os.PathLike)):
            unet.to(self.unet.device)
        return unet

    def _blend(
        self,
        pair: ModelPair,
        cond: Conditioning,
        store: AttentionStore,
        *,
        guidance_cond: Conditioning,
        alpha: float,
        num_inference_steps: int,
        height: int,
        width: int,
        eta: float,
        generator: Any,
        latents: Tensor | None,
        guidance_steps: GuidanceSteps,
        schedule: str,
        return_reference: bool,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: Any,
        attention_callback: AttentionCallback | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The UNet pipelines' timesteps and start latent, then G and E through :meth:`_sample`."""
        device = self._execution_device
        batch_size = cond.embeds.shape[0] // (2 if cond.do_cfg else 1)

        # Timesteps and the start latent l_T, shared by G and E (kept in float32)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        channels = self.unet.config.in_channels
        latents = self.prepare_latents(
            batch_size, channels, height, width, cond.embeds.dtype, device, generator, latents
        ).float()

        # The DreamBlend loop: G records reference maps, E follows them (DESIGN §2)
        return self._sample(
            pair,
            cond,
            store,
            self.scheduler,
            timesteps,
            latents,
            guidance_cond=guidance_cond,
            alpha=alpha,
            guidance_steps=guidance_steps,
            schedule=schedule,
            return_reference=return_reference,
            edit_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            guidance_step_kwargs=self.prepare_extra_step_kwargs(fork_generator(generator), eta),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            attention_callback=attention_callback,
        )

    @torch.no_grad()
    def invert(
        self,
        image: Any,
        prompt: str | list[str] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        model: str = "guidance",
        guidance_adapter: AdapterSpec = None,
        edit_adapter: AdapterSpec = None,
        guidance_token_embeddings: Mapping[str, Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """DDIM-invert ``image`` into a start latent for ``pipe(..., latents=...)`` (real-image editing).

        The image is encoded with the VAE (posterior mean) and run up the DDIM trajectory with the
        ``model`` role ("guidance" by default, or "edit"), without CFG unless ``guidance_scale > 1``.
        Sample the result with the same ``num_inference_steps`` and a ``DDIMScheduler``; with
        ``cross_attention_guidance_scale=0`` and ``guidance_scale=1`` the reference reconstructs the image.
        ``guidance_token_embeddings`` (as for the call) apply when G inverts.
        """
        if not isinstance(self.scheduler, DDIMScheduler):
            warnings.warn(
                f"the pipeline samples with {type(self.scheduler).__name__}; DDIM-inverted latents "
                "reproduce the image only under DDIM: set "
                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)",
                UserWarning,
                stacklevel=2,
            )
        pair = self._model_pair(guidance_adapter, edit_adapter)
        device = self._execution_device
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(device)
        latents = vae_encode(self.vae, pixels, upcast=self._vae_upcast())
        per_prompt = latents.shape[0] if isinstance(prompt, str) else 1
        with self._token_scope(guidance_token_embeddings if model == "guidance" else None):
            cond = self._conditioning(
                prompt=prompt,
                negative_prompt=negative_prompt,
                guidance_scale=guidance_scale,
                num_images_per_prompt=per_prompt,
                device=device,
                height=pixels.shape[-2],
                width=pixels.shape[-1],
            )
        if cond.embeds.shape[0] // (2 if cond.do_cfg else 1) != latents.shape[0]:
            raise ValueError(
                f"invert() got {latents.shape[0]} image(s) but {cond.embeds.shape[0]} prompt embedding rows; "
                "pass one prompt, or one per image"
            )
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config)
        inverse.set_timesteps(num_inference_steps, device=device)
        with pair.session():
            unet = pair.use(model)
            for t in self.progress_bar(inverse.timesteps):
                latents, _ = cfg_step(unet, inverse, latents, t, cond, {})
        return latents
