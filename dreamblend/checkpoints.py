"""Loading DreamBlend's checkpoints: diffusers folders or hub ids, LoRA files, Custom Diffusion files,
and the checkpoint folders ``dreamblend train`` writes (with their learned tokens).

The denoiser is a UNet (SD1.x/2.x, SDXL) or an MMDiT transformer (SD3/3.5, FLUX); G and E are full
checkpoints of it or LoRA adapters on it, in diffusers' formats (the DreamBooth-LoRA scripts' files
load unchanged).

Pickle-based weight files (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) can run arbitrary code when
loaded, so they are refused unless the caller opts in with ``allow_pickle=True`` (``--allow-pickle``).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from dreamblend.custom_diffusion import is_custom_diffusion_state_dict, load_custom_diffusion
from dreamblend.hub import DTYPE_KWARG, hub_errors

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PathLike = str | os.PathLike


def _pickle_refused(path: Path) -> ValueError:
    return ValueError(
        f"{path} is a pickle file, which can execute code when loaded; convert it to .safetensors, or pass "
        "allow_pickle=True (CLI: --allow-pickle) if you trust its source"
    )


def _check_no_pickle_only(folder: Path, allow_pickle: bool) -> None:
    """Refuse a diffusers folder whose weights exist only in a pickle format."""
    if allow_pickle or not folder.is_dir():
        return
    for sub in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
        files = [p for p in sub.iterdir() if p.is_file()]
        if not any(p.suffix == ".safetensors" for p in files):
            pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise _pickle_refused(pickled[0])


def _check_hub_id(spec: PathLike) -> None:
    """A name that is not an existing path must look like a hub id ("org/name"), else it is a typo."""
    text = str(spec)
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith(".") or Path(parts[0]).is_dir():
        raise FileNotFoundError(
            f"model folder {text} does not exist (and it is not a hub id like 'org/name')"
        )


def read_state_dict(path: PathLike, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a pickle file when ``allow_pickle`` (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refused(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: unknown weight format {path.suffix!r}; expected .safetensors")


LORA_FILE = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"


def checkpoint_kind(path: PathLike, *, allow_pickle: bool = False) -> tuple[str, str]:
    """What ``path`` holds, and where: ("diffusers", folder or hub id), ("lora" or "custom_diffusion", file).

    A folder holding only a LoRA or Custom Diffusion weight file under its diffusers name (a training
    checkpoint folder) counts as that file.
    """
    path = Path(path)
    if path.is_dir():
        for name, kind in ((LORA_FILE, "lora"), (CUSTOM_DIFFUSION_FILE, "custom_diffusion")):
            if (
                (path / name).is_file()
                and not (path / "unet").is_dir()
                and not (path / "transformer").is_dir()
                and not (path / "config.json").is_file()
            ):
                return kind, str(path / name)
    if not path.is_file():
        return "diffusers", str(path)
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    else:
        keys = list(read_state_dict(path, allow_pickle=allow_pickle))
    if is_custom_diffusion_state_dict(dict.fromkeys(keys)):
        return "custom_diffusion", str(path)
    if keys and all("lora" in k for k in keys):
        return "lora", str(path)
    raise ValueError(
        f"{path} is neither a LoRA nor a Custom Diffusion checkpoint (keys like {keys[:2]}); "
        "pass a diffusers folder for a full checkpoint"
    )


def load_unet(
    spec: UNet2DConditionModel | DiffusionPipeline | PathLike,
    *,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> UNet2DConditionModel:
    """A UNet from a UNet, a pipeline, a diffusers folder (pipeline or UNet folder) or a hub id."""
    return load_denoiser(spec, UNet2DConditionModel, allow_pickle=allow_pickle, torch_dtype=torch_dtype)


def load_denoiser(
    spec: torch.nn.Module | DiffusionPipeline | PathLike,
    cls: type[torch.nn.Module],
    *,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> Any:
    """A ``cls`` model (a UNet or a transformer) from one, a pipeline, a diffusers folder (pipeline or
    model folder) or a hub id of a pipeline."""
    component, noun = ("unet", "UNet") if cls is UNet2DConditionModel else ("transformer", "transformer")
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, DiffusionPipeline):
        model = getattr(spec, component, None)
        if not isinstance(model, cls):
            raise TypeError(f"{type(spec).__name__} has no {cls.__name__} to use as a DreamBlend model")
        return model
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"expected a {cls.__name__}, a pipeline, a diffusers folder or a hub id, "
            f"got {type(spec).__name__}"
        )
    path = Path(spec)
    if path.is_file():
        raise ValueError(
            f"{path} is a single weight file; a model is a diffusers folder (with {component}/) or a hub id. "
            "LoRA and Custom Diffusion files are adapters on the base model: see prepare_models()"
        )
    subfolder = None
    if path.is_dir():
        subfolder = component if (path / component).is_dir() else None
        folder = path / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{path} is not a diffusers pipeline or {noun} folder (no {component}/config.json or "
                "config.json)"
            )
        _check_no_pickle_only(folder, allow_pickle)
    else:
        _check_hub_id(spec)
        subfolder = component  # a hub id of a full pipeline
    with hub_errors(spec):
        return cls.from_pretrained(
            str(spec),
            subfolder=subfolder,
            use_safetensors=None if allow_pickle else True,
            **{DTYPE_KWARG: torch_dtype},
        )


# model_index.json's transformer class -> the DreamBlend pipeline's name in dreamblend.mmdit
MMDIT_PIPELINES = {
    "SD3Transformer2DModel": "DreamBlendSD3Pipeline",
    "FluxTransformer2DModel": "DreamBlendFluxPipeline",
}


def is_mmdit(pipeline: type) -> bool:
    """Whether a DreamBlend pipeline class runs an MMDiT transformer (SD3, FLUX) rather than a UNet."""
    return pipeline.__name__ in MMDIT_PIPELINES.values()


def _model_index(model: PathLike) -> dict[str, Any]:
    """A pipeline's ``model_index.json`` (from its folder, or the hub)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return json.loads(index.read_text())
    _check_hub_id(model)
    with hub_errors(model):
        return dict(DiffusionPipeline.load_config(str(model)))


def pipeline_class(model: PathLike) -> type[DiffusionPipeline]:
    """The DreamBlend pipeline for a base model, read from its ``model_index.json``.

    A ``transformer`` component makes it an MMDiT model (SD3/3.5, FLUX), ``text_encoder_2`` beside a
    UNet SDXL, else SD1.x/2.x.
    """
    import dreamblend.mmdit
    from dreamblend.pipelines import DreamBlendPipeline, DreamBlendXLPipeline

    config = _model_index(model)
    if "transformer" in config:
        transformer = (config["transformer"] or [None, None])[-1]
        if transformer not in MMDIT_PIPELINES:
            raise ValueError(
                f"{model} is a {config.get('_class_name', 'pipeline')} with a {transformer} transformer; "
                f"DreamBlend runs UNet models (SD1.x/2.x, SDXL) and {', '.join(MMDIT_PIPELINES)} (SD3, FLUX)"
            )
        return getattr(dreamblend.mmdit, MMDIT_PIPELINES[transformer])
    return DreamBlendXLPipeline if "text_encoder_2" in config else DreamBlendPipeline


def saved_without(model: PathLike) -> dict[str, None]:
    """``{component: None}`` for the components a pipeline was saved without (``[null, null]`` in its
    ``model_index.json``, e.g. SD3 without T5), which ``from_pretrained`` wants passed explicitly."""
    return {k: None for k, v in _model_index(model).items() if not k.startswith("_") and v == [None, None]}


def load_pipeline(
    model: PathLike, *, allow_pickle: bool = False, torch_dtype: torch.dtype | None = None, **kwargs: Any
) -> DiffusionPipeline:
    """The DreamBlend pipeline for a base model (diffusers folder or hub id), safetensors only by default.

    Components the folder leaves out (``[null, null]`` in ``model_index.json``, e.g. SD3 saved without
    its T5 encoder) load as None, which diffusers otherwise refuses for required components.
    """
    cls = pipeline_class(model)
    _check_no_pickle_only(Path(model), allow_pickle)
    if cls.__name__ == "DreamBlendXLPipeline":
        kwargs.setdefault("add_watermarker", False)
    kwargs = {**saved_without(model), **kwargs}
    with hub_errors(model):
        return cls.from_pretrained(
            str(model), use_safetensors=None if allow_pickle else True, **{DTYPE_KWARG: torch_dtype}, **kwargs
        )


@dataclass(frozen=True)
class RoleCheckpoint:
    """What one role's ``ModelSpec.model`` resolves to.

    ``kind``: "diffusers" (``where`` is a folder or hub id), "lora" or "custom_diffusion" (``where`` is
    the file), or None for the base model; ``embeddings``: the learned-token files that go with it.
    """

    kind: str | None
    where: str | None = None
    embeddings: tuple[Path, ...] = ()
    base_model: str | None = None


def resolve_checkpoint(model: PathLike, *, allow_pickle: bool = False) -> RoleCheckpoint:
    """Resolve a model argument; a ``dreamblend train`` checkpoint folder is read from its manifest."""
    from dreamblend.training.trajectory import MANIFEST_FILE, read_checkpoint

    path = Path(model)
    if (path / MANIFEST_FILE).is_file():
        info = read_checkpoint(path)
        if info.unet is not None:
            kind, where = "diffusers", str(info.unet)
        elif info.lora is not None:
            kind, where = "lora", str(info.lora)
        else:
            kind, where = None, None  # e.g. AttnDreamBooth stage 1: the token only
        embeddings = () if info.embedding is None else (info.embedding,)
        return RoleCheckpoint(kind, where, embeddings, info.base_model)
    kind, where = checkpoint_kind(model, allow_pickle=allow_pickle)
    embeddings = [path / EMBEDDING_FILE] if (path / EMBEDDING_FILE).is_file() else []
    if kind == "custom_diffusion":
        embeddings += modifier_token_files(Path(where).parent, allow_pickle=allow_pickle)
    return RoleCheckpoint(kind, where, tuple(embeddings))


def modifier_token_files(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """Custom Diffusion's learned tokens beside its weights: ``<new1>.safetensors`` holding ``{"<new1>": v}``.

    A file counts when its one key is its own name (diffusers' training script writes them so); a
    pickled one (``<new1>.bin``) without a safetensors twin is refused unless allowed, never skipped.
    """
    files = []
    for file in sorted(folder.iterdir()):
        if file.suffix == ".safetensors":
            with safetensors.safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
            if keys == [file.stem]:
                files.append(file)
        elif (
            file.suffix in PICKLE_SUFFIXES
            and file.stem.startswith("<")
            and file.stem.endswith(">")
            and not file.with_suffix(".safetensors").is_file()
        ):
            if not allow_pickle:
                raise _pickle_refused(file)
            files.append(file)
    return files


def _same_model(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b


def check_base_model(pipe: Any, role: str, model: str, checkpoint: RoleCheckpoint) -> None:
    """Warn when a training checkpoint was made from another base model than the pipeline's."""
    base = getattr(pipe, "name_or_path", None)
    if checkpoint.base_model and base and not _same_model(checkpoint.base_model, base):
        warnings.warn(
            f"the {role} checkpoint {model} was trained from {checkpoint.base_model}, but the pipeline's "
            f"base model is {base}; LoRA, Custom Diffusion and token files apply to the base model they "
            "were trained on, so pass that one as the model",
            UserWarning,
            stacklevel=3,
        )


def read_token_embeddings(path: PathLike, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """``{token: vector}`` from a learned-embedding file (diffusers' textual-inversion layout)."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    if not state or not all(isinstance(v, Tensor) and v.is_floating_point() for v in state.values()):
        raise ValueError(
            f"{path} is not a learned-token file: expected {{token: embedding vector}} as written by "
            "'dreamblend train attndreambooth' or diffusers' textual inversion"
        )
    return state


def load_token_embeddings(pipe: Any, embeddings: dict[str, dict[str, Tensor]]) -> dict[str, Tensor] | None:
    """Put the roles' learned tokens into the pipeline's text encoder; returns G's differing vectors.

    The text encoder holds E's vector for a token both roles learned (G's where only G has it). Where
    G's differs (an earlier stage of the same run) it comes back as ``guidance_token_embeddings``.
    """
    if not embeddings:
        return None
    if getattr(pipe, "transformer", None) is not None:
        raise ValueError(
            f"a checkpoint holds a learned token embedding, but {type(pipe).__name__} encodes prompts with "
            "several text encoders (CLIP and T5) and these files hold one vector per token; use DreamBooth "
            "(full or LoRA) checkpoints for SD3 and FLUX"
        )
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError(
            "a checkpoint holds a learned token embedding, but SDXL has two text encoders and these files "
            "hold one vector per token; use DreamBooth (full or LoRA) checkpoints for SDXL"
        )
    guidance, edit = embeddings.get("guidance", {}), embeddings.get("edit", {})
    shared = {**guidance, **edit}
    pipe.load_textual_inversion([{token: v} for token, v in shared.items()], token=list(shared))
    own = {token: v for token, v in guidance.items() if not torch.equal(v, shared[token])}
    return own or None


@dataclass(frozen=True)
class ModelSpec:
    """One role's checkpoint as named on the command line or in a jobs file.

    ``model``: a diffusers folder / hub id (a full checkpoint), a LoRA file or a Custom Diffusion file
    (both applied to the base model); None means the base model. ``adapter``: a LoRA file.
    """

    model: str | None = None
    adapter: str | None = None

    def describe(self) -> str:
        return " + ".join(x for x in (self.model or "base", self.adapter) if x)


def load_lora(pipe: Any, model: torch.nn.Module, path: PathLike, name: str, *, allow_pickle: bool) -> None:
    """Load a LoRA file into ``model`` (the UNet or transformer) as adapter ``name``, with diffusers' key
    conversion and metadata; text-encoder weights in the file are dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise _pickle_refused(path)
    # FLUX's loader returns the alphas only when asked; SD3's has none (the rank scaling is in metadata).
    returns_alphas = "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters
    state_dict, *alphas, metadata = pipe.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        use_safetensors=path.suffix == ".safetensors",
        local_files_only=True,
        return_lora_metadata=True,
        **({"return_alphas": True} if returns_alphas else {}),
    )
    if any(k.startswith(("text_encoder", "lora_te")) for k in state_dict):
        warnings.warn(
            f"{path} also holds text-encoder LoRA weights; DreamBlend's G and E share the text encoders, so "
            "they are not loaded",
            UserWarning,
            stacklevel=2,
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("text_encoder", "lora_te"))}
    kwargs: dict[str, Any] = {"adapter_name": name, "metadata": metadata, "_pipeline": pipe}
    if isinstance(model, UNet2DConditionModel):
        load, kwargs["unet"] = pipe.load_lora_into_unet, model
    else:
        load, kwargs["transformer"] = pipe.load_lora_into_transformer, model
    if "network_alphas" in inspect.signature(load).parameters:
        kwargs["network_alphas"] = alphas[0] if alphas else None
    with warnings.catch_warnings():
        # G and E as two adapters of one model is the point of role adapters, not an accident.
        warnings.filterwarnings(
            "ignore", message="Already found a `peft_config` attribute", category=UserWarning
        )
        load(state_dict, **kwargs)
    if name not in (getattr(model, "peft_config", None) or {}):
        raise ValueError(
            f"{path} holds no LoRA weights for this pipeline's {type(model).__name__} (keys like "
            f"{list(state_dict)[:2]}); it was trained for another kind of model: pass a LoRA of the base "
            "model"
        )


def prepare_models(
    pipe: Any, guidance: ModelSpec, edit: ModelSpec, *, allow_pickle: bool = False
) -> dict[str, Any]:
    """Put G and E into ``pipe`` (``unet`` is E, ``guidance_unet`` G; ``transformer`` and
    ``guidance_transformer`` for SD3/FLUX); returns the call's role kwargs.

    Full checkpoints replace the base model for their role; LoRA files become adapters named after the
    role; Custom Diffusion files (UNets only) install their processors on the base UNet (on a copy when
    the other role also uses the base). Without any guidance checkpoint G is the base model (adapters off).
    ``dreamblend train`` checkpoint folders are read from their manifest. Learned tokens (a
    ``learned_embeds.safetensors``, or Custom Diffusion's modifier tokens beside its weights) go into
    the text encoder (see :func:`load_token_embeddings`).
    """
    specs = {"guidance": guidance, "edit": edit}
    kinds: dict[str, str | None] = {}
    where: dict[str, str] = {}
    embeddings: dict[str, dict[str, Tensor]] = {}
    adapters = {role: s.adapter for role, s in specs.items()}
    for role, spec in specs.items():
        kinds[role] = None
        if spec.model:
            resolved = resolve_checkpoint(spec.model, allow_pickle=allow_pickle)
            check_base_model(pipe, role, spec.model, resolved)
            kinds[role] = resolved.kind
            if resolved.where is not None:
                where[role] = resolved.where
            for file in resolved.embeddings:
                tokens = read_token_embeddings(file, allow_pickle=allow_pickle)
                embeddings[role] = {**embeddings.get(role, {}), **tokens}
        if kinds[role] == "lora":
            if adapters[role]:
                raise ValueError(
                    f"the {role} model is a LoRA and a {role} adapter is given too; pass one of them"
                )
            adapters[role], kinds[role] = where[role], None
    component = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    base = getattr(pipe, component)
    custom = [role for role in ("edit", "guidance") if kinds[role] == "custom_diffusion"]
    if custom and component == "transformer":
        raise ValueError(
            f"the {custom[0]} checkpoint {specs[custom[0]].model} is a Custom Diffusion file, which adapts a "
            f"UNet's cross-attention; {type(pipe).__name__} has a transformer: use a DreamBooth (full or "
            "LoRA) checkpoint"
        )
    unets: dict[str, Any] = {}
    for role, kind in kinds.items():
        if kind == "diffusers":
            unets[role] = load_denoiser(
                where[role], type(base), allow_pickle=allow_pickle, torch_dtype=base.dtype
            )
            unets[role].to(base.device)
        elif kind is None:
            unets[role] = base
    # Copies are taken before Custom Diffusion weights go onto the base UNet itself (when it is free).
    for i, role in reversed(list(enumerate(custom))):
        free = i == 0 and base not in unets.values()
        unets[role] = base if free else copy.deepcopy(base)
        load_custom_diffusion(unets[role], read_state_dict(where[role], allow_pickle=allow_pickle))
    pipe.register_modules(**{component: unets["edit"]})
    guidance_model = None if unets["guidance"] is unets["edit"] else unets["guidance"]
    pipe.register_modules(**{f"guidance_{component}": guidance_model})
    for role, file in adapters.items():
        if file:
            load_lora(pipe, unets[role], file, role, allow_pickle=allow_pickle)
    kwargs: dict[str, Any] = {f"{role}_adapter": role if adapters[role] else None for role in specs}
    own = load_token_embeddings(pipe, embeddings)
    if own is not None:
        kwargs["guidance_token_embeddings"] = own
    return kwargs


def load_dreamblend(
    model: PathLike,
    guidance: ModelSpec | None = None,
    edit: ModelSpec | None = None,
    *,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """A ready DreamBlend pipeline for a base model and two role checkpoints, plus its call kwargs."""
    pipe = load_pipeline(model, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    kwargs = prepare_models(pipe, guidance or ModelSpec(), edit or ModelSpec(), allow_pickle=allow_pickle)
    return pipe, kwargs
