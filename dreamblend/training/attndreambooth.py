"""AttnDreamBooth (Pang et al. 2024): three training stages with a cross-attention map regularizer.

1. the new token's input embedding only (learns how [V] aligns with other words, stopped early);
2. the cross-attention layers (refines where [V] attends);
3. the whole UNet (learns the subject's identity).

The text encoder stays frozen throughout; the one trained row is a separate parameter substituted
for the token's embedding by a forward hook, so every other weight of the text encoder is
untouched by construction. The regularizer (:mod:`dreamblend.training.regularizer`) reads the
[V] and category maps of every cross-attention layer through :class:`dreamblend.AttentionStore`.
Steps, learning rates and lambdas default to the paper's (60/100/500 steps, 1e-3/2e-5/2e-6,
lambda_mu 0.1/2/2, lambda_sigma 0/5/5, batch 8); the checkpoint trajectory spans all three stages.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dreamblend.ops import BACKENDS
from dreamblend.processor import attach
from dreamblend.store import AttentionStore
from dreamblend.tokens import substitute
from dreamblend.training.data import list_images
from dreamblend.training.engine import (
    Batch,
    Conditioning,
    Phase,
    Source,
    TrainConfig,
    Trainer,
    TrainingInputError,
    TrainingResult,
    check_choice,
    encode_prompt,
    fill_prompt,
)
from dreamblend.training.regularizer import REDUCTIONS, attention_map_regularizer

EMBEDDING_FILE = "learned_embeds.safetensors"
STAGE2_PARAMETERS = {
    "attn2": (".attn2.",),  # every projection of the cross-attention layers (the paper)
    "kv": (".attn2.to_k.", ".attn2.to_v."),  # keys and values only (Custom Diffusion)
}


@dataclass
class AttnDreamBoothConfig(TrainConfig):
    """AttnDreamBooth settings; per-stage values are (stage 1, stage 2, stage 3)."""

    token: str = "<sks>"
    batch_size: int = 8
    prompt: str = "a photo of a {token} {class}"
    steps: tuple[int, int, int] = (60, 100, 500)
    learning_rates: tuple[float, float, float] = (1e-3, 2e-5, 2e-6)
    lambda_mu: tuple[float, float, float] = (0.1, 2.0, 2.0)
    lambda_sigma: tuple[float, float, float] = (0.0, 5.0, 5.0)
    stage2_parameters: str = "attn2"
    reg_reduction: str = "paper"
    backend: str = "auto"


class AttnDreamBoothTrainer(Trainer):
    method = "attndreambooth"

    def __init__(self, config: AttnDreamBoothConfig) -> None:
        super().__init__(config)
        self.config: AttnDreamBoothConfig = config
        self._hooks = contextlib.ExitStack()
        self._stage_parameters: dict[int, dict[str, nn.Parameter]] = {}

    @property
    def prompt(self) -> str:
        return fill_prompt(self.config.prompt, self.config.token, self.config.class_word)

    def validate(self) -> None:
        super().validate()
        cfg = self.config
        for flag, values in (
            ("--steps", cfg.steps),
            ("--lr", cfg.learning_rates),
            ("--lambda-mu", cfg.lambda_mu),
            ("--lambda-sigma", cfg.lambda_sigma),
        ):
            if len(values) != 3:
                raise TrainingInputError(f"{flag} takes one value per stage (3), got {list(values)}")
        check_choice(cfg.stage2_parameters, tuple(STAGE2_PARAMETERS), "--stage2-params")
        check_choice(cfg.reg_reduction, REDUCTIONS, "--reg-reduction")
        check_choice(cfg.backend, BACKENDS, "--backend")
        if "{token}" not in cfg.prompt or "{class}" not in cfg.prompt:
            raise TrainingInputError(
                f"--prompt {cfg.prompt!r} must contain {{token}} and {{class}}: the regularizer compares "
                "their maps"
            )

    def phases(self) -> list[Phase]:
        cfg = self.config
        return [
            Phase(f"stage{i + 1}", cfg.steps[i], cfg.learning_rates[i], cfg.lambda_mu[i], cfg.lambda_sigma[i])
            for i in range(3)
        ]

    def setup(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        super().setup()
        cfg, pipe = self.config, self.pipe
        if isinstance(pipe, StableDiffusionXLPipeline):
            raise TrainingInputError(
                "attndreambooth supports SD1.x/2.x models (the paper's setting); use 'train dreambooth' "
                "for SDXL"
            )
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        class_ids = tokenizer(cfg.class_word, add_special_tokens=False).input_ids
        if len(class_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(class_ids)
            raise TrainingInputError(
                f"category {cfg.class_word!r} is {len(class_ids)} tokens {pieces} for this tokenizer; [V] is "
                "initialized from and regularized towards one category token, so pass --class a single-token "
                "word (e.g. 'toy' rather than 'stuffed animal')"
            )
        existing = tokenizer(cfg.token, add_special_tokens=False).input_ids
        if len(existing) == 1 or tokenizer.add_tokens(cfg.token) == 0:
            raise TrainingInputError(
                f"token {cfg.token!r} is already in the tokenizer's vocabulary; AttnDreamBooth learns a new "
                "token, so pass --token a string the vocabulary lacks (e.g. '<sks>')"
            )
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set below
        self.token_id = tokenizer.convert_tokens_to_ids(cfg.token)
        embeddings = encoder.get_input_embeddings()
        with torch.no_grad():
            embeddings.weight[self.token_id] = embeddings.weight[class_ids[0]]
        ids = tokenizer(self.prompt, max_length=tokenizer.model_max_length, truncation=True).input_ids
        if self.token_id not in ids or class_ids[0] not in ids:
            raise TrainingInputError(
                f"prompt {self.prompt!r} does not contain the token {cfg.token!r} and the category "
                f"{cfg.class_word!r} as separate tokens within {tokenizer.model_max_length}; keep "
                "{token} and {class} as separate words near the start of --prompt"
            )
        token_at = ids.index(self.token_id)
        after = [i for i, t in enumerate(ids) if t == class_ids[0] and i > token_at]
        token_positions = [token_at, after[0] if after else ids.index(class_ids[0])]  # "[V] dog" pairs up
        self.embedding = nn.Parameter(embeddings.weight[self.token_id].detach().clone().float())
        self._hooks.callback(embeddings.register_forward_hook(self._substitute).remove)
        self.store = AttentionStore(tokens=token_positions, head_mean=False, backend=cfg.backend)
        self._hooks.enter_context(attach(self.unet, self.store))
        self.sources = [
            Source(self.encode_images(list_images(cfg.instance_dir, flag="--instance-dir")), None)
        ]

    def _substitute(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """Put the trained embedding where the prompt has the new token."""
        return substitute(inputs[0], output, {self.token_id: self.embedding})

    def phase_parameters(self, index: int) -> dict[str, nn.Parameter]:
        if index not in self._stage_parameters:
            named = [(f"unet.{n}", p) for n, p in self.unet.named_parameters()]
            if index == 0:
                chosen = {"token_embedding": self.embedding}
            elif index == 1:
                parts = STAGE2_PARAMETERS[self.config.stage2_parameters]
                chosen = {n: p for n, p in named if any(part in n for part in parts)}
            else:
                chosen = dict(named)
            self._stage_parameters[index] = chosen
        return self._stage_parameters[index]

    def on_phase(self, index: int) -> None:
        conditioning = None
        if index > 0:  # the embedding is frozen from stage 2 on: encode the prompt once
            with torch.no_grad():
                conditioning = encode_prompt(self.pipe, self.prompt, self.device)
        self.sources[0].conditioning = conditioning

    def condition(self, source: int) -> Conditioning:
        if self.sources[source].conditioning is None:
            return encode_prompt(self.pipe, self.prompt, self.device)
        return super().condition(source)

    def _phase(self) -> Phase:
        return self.phases()[self.phase_index]

    def capture(self) -> contextlib.AbstractContextManager:
        phase = self._phase()
        return self.store.record() if phase.lambda_mu or phase.lambda_sigma else contextlib.nullcontext()

    def losses(self, pred: Tensor, target: Tensor, batch: Batch) -> dict[str, Tensor]:
        terms = super().losses(pred, target, batch)
        phase = self._phase()
        if not (phase.lambda_mu or phase.lambda_sigma):
            return terms
        reg = attention_map_regularizer(
            self.store.maps,
            lambda_mu=phase.lambda_mu,
            lambda_sigma=phase.lambda_sigma,
            reduction=self.config.reg_reduction,
        )
        return {"loss": terms["loss"] + reg, "loss_diffusion": terms["loss"], "loss_reg": reg}

    def write_checkpoint(self, directory: Path) -> dict[str, str | None]:
        vector = self.embedding.detach().float().cpu().clone()
        save_file({self.config.token: vector}, str(directory / EMBEDDING_FILE))
        unet = None
        if self.phase_index > 0:  # stage 1 leaves the UNet as the base model's
            self.unet.save_pretrained(directory / "unet", safe_serialization=True)
            unet = "unet"
        return {"unet": unet, "lora": None, "embedding": EMBEDDING_FILE}

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"mode": "full", "token": cfg.token, "class": cfg.class_word, "prompt": self.prompt}

    def finish(self) -> None:
        """Write the learned row into the text encoder, so the returned pipeline works without the hook."""
        embeddings = self.pipe.text_encoder.get_input_embeddings()
        with torch.no_grad():
            embeddings.weight[self.token_id] = self.embedding.to(embeddings.weight.dtype)

    def close(self) -> None:
        self._hooks.close()


def train_attndreambooth(config: AttnDreamBoothConfig) -> TrainingResult:
    """Run the three AttnDreamBooth stages; checkpoints land in ``config.output_dir``."""
    return AttnDreamBoothTrainer(config).run()
