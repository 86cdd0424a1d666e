"""``dreamblend batch JOBS``: prompts x seeds x checkpoint pairs x alpha/CFG grids, resumable.

Output folder layout:

- ``<item>.png``: one image per item;
- ``records/<id>.json``: the item's manifest record, written after its PNG; an item is finished
  exactly when its record exists, so a killed run resumes where it stopped;
- ``manifest.jsonl``: every finished item's record in item order, rebuilt from ``records/`` when a
  run ends.

Every file is written to a temporary name and moved into place with ``os.replace``. Under
``accelerate launch`` process ``r`` of ``n`` takes items ``r, r+n, ...`` of the one deterministic item
list and writes only its own items' files; the main process merges the manifest after all finished.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dreamblend.commands import help_text
from dreamblend.commands.generate import (
    CommandError,
    add_runtime_arguments,
    atomic_write,
    call_options,
    check_model_options,
    check_roles_given,
    ensure_writable_dir,
    parse_guidance_steps,
    parse_layers,
    resolve_runtime,
    save_png,
)

EPILOG = """\
JOBS (YAML or JSON); paths are relative to the jobs file's folder:

  model: models/sd15                 # base pipeline (diffusers folder or hub id): SD, SDXL, SD3, FLUX
  output_dir: runs/dog               # or --out
  prompts: ["a sks dog in the jungle", "a sks dog on the beach"]
  # a prompt may name its subject (recorded for `dreamblend eval`): {prompt: "a sks dog", subject: dog2}
  seeds: [0, 1, 2]                   # or {start: 0, count: 8}
  pairs:                             # G/E checkpoint pairs, as for `dreamblend generate`
    - {guidance: ckpt/checkpoint-100, edit: ckpt/checkpoint-400}
    - {guidance_adapter: lora-100.safetensors, edit_adapter: lora-400.safetensors, name: lora}
  alpha: [0.0, 0.07, 0.1]            # one value or a grid
  cfg: [2.0, 3.0]
  steps: 50
  # optional: negative_prompt, height, width, batch_size (4), guidance_steps ("0:0.5" or [0, 1]),
  # layers, tokens, head_mean, schedule, allow_pickle

Items are pairs x cfg x alpha x prompts x seeds; images of one pair and alpha/CFG setting share a forward.
Models and pairs as for `dreamblend generate` (see its help for SD3 and FLUX: for FLUX, cfg is the
distilled guidance value and negative_prompt does not apply).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="resumable batch generation over prompts, seeds, checkpoint pairs and alpha/CFG grids",
        description=help_text(__doc__.splitlines()[0]),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("jobs", type=Path, help="jobs file (.yaml, .yml or .json)")
    parser.add_argument("--out", type=Path, help="output folder (default: the jobs file's output_dir)")
    parser.add_argument("--batch-size", type=int, help="images per forward (default: jobs file, else 4)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Pair:
    """One guidance/edit checkpoint pair (each side: a model and/or a LoRA adapter; None = base)."""

    guidance: str | None = None
    edit: str | None = None
    guidance_adapter: str | None = None
    edit_adapter: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Item:
    """One image to make; ``key`` holds everything that determines its pixels."""

    pair: int
    prompt: str
    seed: int
    alpha: float | None
    cfg: float
    key: str = field(compare=False)
    subject: str | None = None

    @property
    def id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        return f"p{self.pair:02d}-s{self.seed}-{self.id}.png"


PAIR_KEYS = {f.name for f in Pair.__dataclass_fields__.values()}
JOB_KEYS = {
    "model", "output_dir", "prompts", "seeds", "pairs", "alpha", "cfg", "steps", "negative_prompt", "height",
    "width", "batch_size", "guidance_steps", "layers", "tokens", "head_mean", "schedule", "allow_pickle",
}  # fmt: skip


@dataclass
class Jobs:
    """A parsed jobs file (see the command's help for the format)."""

    model: str
    prompts: list[tuple[str, str | None]]
    """(prompt, subject or None) pairs."""
    seeds: list[int]
    pairs: list[Pair]
    alphas: list[float | None] = field(default_factory=lambda: [None])
    cfgs: list[float] = field(default_factory=lambda: [3.0])
    steps: int = 50
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    guidance_steps: Any = None
    layers: list[str | int] | None = None
    tokens: list[int] | None = None
    head_mean: bool = False
    schedule: str = "lockstep"
    allow_pickle: bool = False
    output_dir: Path | None = None

    @classmethod
    def load(cls, path: Path) -> Jobs:
        import yaml

        if not path.is_file():
            raise CommandError(f"jobs file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())  # JSON is YAML too
        except yaml.YAMLError as exc:
            raise CommandError(f"cannot parse jobs file {path}: {exc}") from None
        return cls.parse(data, path.parent)

    @classmethod
    def parse(cls, data: Any, base: Path) -> Jobs:
        if not isinstance(data, dict):
            raise CommandError("a jobs file must be a mapping with model, prompts, seeds and pairs")
        unknown = sorted(set(data) - JOB_KEYS)
        if unknown:
            raise CommandError(f"unknown jobs keys {unknown}; allowed: {sorted(JOB_KEYS)}")
        missing = [k for k in ("model", "prompts", "pairs") if k not in data]
        if missing:
            raise CommandError(f"the jobs file needs {missing}")
        local = lambda value: _local_path(value, base)
        steps = data.get("guidance_steps")
        try:
            steps = parse_guidance_steps(steps) if isinstance(steps, str) else steps
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"jobs key 'guidance_steps': {exc}") from None
        jobs = cls(
            model=local(data["model"]),
            prompts=[_prompt(p) for p in _listed(data["prompts"], (str, dict), "prompts")],
            seeds=_seeds(data.get("seeds", [0])),
            pairs=[_pair(p, local) for p in _listed(data["pairs"], dict, "pairs")],
            alphas=_listed(data.get("alpha", [None]), (int, float, type(None)), "alpha"),
            cfgs=_listed(data.get("cfg", [3.0]), (int, float), "cfg"),
            steps=int(data.get("steps", 50)),
            negative_prompt=data.get("negative_prompt"),
            height=data.get("height"),
            width=data.get("width"),
            batch_size=int(data.get("batch_size", 4)),
            guidance_steps=steps,
            layers=parse_layers(data.get("layers")),
            tokens=data.get("tokens"),
            head_mean=bool(data.get("head_mean", False)),
            schedule=data.get("schedule", "lockstep"),
            allow_pickle=bool(data.get("allow_pickle", False)),
            output_dir=(base / data["output_dir"]).resolve() if data.get("output_dir") else None,
        )
        if jobs.steps < 1 or jobs.batch_size < 1:
            raise CommandError("steps and batch_size must be at least 1")
        from dreamblend.pipelines.blend import resolve_alpha

        for alpha in jobs.alphas:  # fail before any model is loaded
            resolve_alpha(alpha, "epsilon")
        return jobs

    def pipeline_options(self) -> dict[str, Any]:
        """Keyword arguments every item's pipeline call shares."""
        return {
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.steps,
            "guidance_steps": self.guidance_steps,
            "attention_layers": self.layers,
            "attention_tokens": self.tokens,
            "head_mean": self.head_mean,
            "schedule": self.schedule,
        }

    def items(self) -> list[Item]:
        """The deterministic item list (pairs x cfg x alpha x prompts x seeds) every process agrees on."""
        shared = {"model": self.model, **self.pipeline_options()}
        items = []
        grid = itertools.product(enumerate(self.pairs), self.cfgs, self.alphas, self.prompts, self.seeds)
        for (p, pair), cfg, alpha, (prompt, subject), seed in grid:
            models = {k: v for k, v in asdict(pair).items() if k != "name"}  # the name is only a label
            key = {**shared, "pair": models, "cfg": cfg, "alpha": alpha, "prompt": prompt, "seed": seed}
            if subject is not None:  # tells apart subjects sharing a prompt; absent, ids stay as before
                key["subject"] = subject
            text = json.dumps(key, sort_keys=True, default=str)
            items.append(Item(p, prompt, seed, alpha, cfg, text, subject))
        return items


def _local_path(value: Any, base: Path) -> Any:
    """Paths in a jobs file are relative to its folder; other strings (hub ids) pass through."""
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() or value.startswith(".") else value


def _listed(value: Any, kind: Any, name: str) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise CommandError(f"jobs key {name!r} must be one value or a non-empty list of them, got {value!r}")
    return values


def _prompt(value: str | dict) -> tuple[str, str | None]:
    if isinstance(value, str):
        return value, None
    if set(value) != {"prompt", "subject"} or not all(isinstance(v, str) for v in value.values()):
        raise CommandError(
            f"a prompt is a string or a {{prompt: ..., subject: ...}} mapping of strings, got {value!r}"
        )
    return value["prompt"], value["subject"]


def _seeds(value: Any) -> list[int]:
    if isinstance(value, dict):
        if set(value) != {"start", "count"}:
            raise CommandError(f"seeds as a mapping needs exactly start and count, got {value!r}")
        return list(range(int(value["start"]), int(value["start"]) + int(value["count"])))
    return _listed(value, int, "seeds")


def _pair(value: dict, local: Any) -> Pair:
    unknown = sorted(set(value) - PAIR_KEYS)
    if unknown:
        raise CommandError(f"unknown pair keys {unknown}; allowed: {sorted(PAIR_KEYS)}")
    try:
        check_roles_given(
            **{k: value.get(k) for k in ("guidance", "edit", "guidance_adapter", "edit_adapter")}
        )
    except CommandError as exc:
        raise CommandError(f"pair {value}: {exc}") from None
    return Pair(**{k: (v if k == "name" else local(v)) for k, v in value.items()})


# ---------------------------------------------------------------------------------------------- running


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class BatchRunner:
    """Generates one process's share of a jobs file into an output folder."""

    def __init__(
        self,
        jobs: Jobs,
        out: Path,
        *,
        device: Any,
        dtype: Any,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
    ) -> None:
        self.jobs, self.out = jobs, out
        self.device, self.dtype = device, dtype
        self.process_index, self.num_processes = process_index, num_processes
        self.batch_size = jobs.batch_size
        self.progress = progress
        self.records = out / "records"

    def is_done(self, item: Item) -> bool:
        return (self.records / f"{item.id}.json").is_file() and (self.out / item.filename).is_file()

    def run(self) -> tuple[int, int]:
        """Generate this process's unfinished items; returns (generated, already finished)."""
        from tqdm.auto import tqdm

        from dreamblend.checkpoints import ModelSpec, load_dreamblend

        self.records.mkdir(parents=True, exist_ok=True)
        mine = self.jobs.items()[self.process_index :: self.num_processes]
        todo = [item for item in mine if not self.is_done(item)]
        desc = "dreamblend batch" + (f" [{self.process_index}]" if self.num_processes > 1 else "")
        with tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc=desc,
            unit="img",
            position=self.process_index,
            disable=not self.progress,
        ) as bar:
            for p, pair_items in itertools.groupby(todo, key=lambda item: item.pair):
                pair = self.jobs.pairs[p]
                pipe, roles = load_dreamblend(
                    self.jobs.model,
                    ModelSpec(pair.guidance, pair.guidance_adapter),
                    ModelSpec(pair.edit, pair.edit_adapter),
                    device=self.device,
                    torch_dtype=self.dtype,
                    allow_pickle=self.jobs.allow_pickle,
                )
                pipe.set_progress_bar_config(disable=True)  # one bar for the whole batch
                for _, group in itertools.groupby(pair_items, key=lambda item: (item.cfg, item.alpha)):
                    self._generate(pipe, roles, list(group), bar)
                del pipe
                _release_memory()
        return len(todo), len(mine) - len(todo)

    def _generate(self, pipe: Any, roles: dict[str, Any], items: list[Item], bar: Any) -> None:
        """Generate ``items`` (one alpha/CFG setting) in batches, halving the batch on out-of-memory."""
        from dreamblend.pipelines.blend import resolve_alpha

        # None: the model's default; flow-matching schedulers have no prediction type (the MMDiT pipelines'
        # default is the epsilon one)
        alpha = resolve_alpha(items[0].alpha, pipe.scheduler.config.get("prediction_type", "epsilon"))
        queue = deque(_chunks(items, self.batch_size))
        while queue:
            chunk = queue.popleft()
            try:
                start = time.perf_counter()
                images = self._forward(pipe, roles, chunk)
                seconds = time.perf_counter() - start
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                if len(chunk) == 1:
                    raise CommandError(
                        "out of memory with one image per forward; use --dtype float16, a smaller "
                        "height/width, or a larger device"
                    ) from exc
                self.batch_size = max(1, len(chunk) // 2)
                warnings.warn(
                    f"out of memory with {len(chunk)} images per forward; retrying with {self.batch_size}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _release_memory()
                queue = deque(_chunks(chunk + [item for rest in queue for item in rest], self.batch_size))
                continue
            for item, image in zip(chunk, images, strict=True):
                self._write(item, image, alpha, seconds / len(chunk))
                bar.update()

    def _forward(self, pipe: Any, roles: dict[str, Any], chunk: list[Item]) -> list[Any]:
        import torch

        item = chunk[0]
        return pipe(
            [i.prompt for i in chunk],
            generator=[torch.Generator(device="cpu").manual_seed(i.seed) for i in chunk],
            guidance_scale=item.cfg,
            cross_attention_guidance_scale=item.alpha,
            **call_options(self.jobs.pipeline_options()),
            **roles,
        ).images

    def _write(self, item: Item, image: Any, alpha: float, seconds: float) -> None:
        """PNG first, then the record that marks the item finished (both atomic)."""
        from dreamblend.checkpoints import ModelSpec

        pair = self.jobs.pairs[item.pair]
        save_png(image, self.out / item.filename)
        record = {
            "id": item.id,
            "file": item.filename,
            "prompt": item.prompt,
            "subject": item.subject,
            "negative_prompt": self.jobs.negative_prompt,
            "seed": item.seed,
            "model": self.jobs.model,
            "pair": pair.name or item.pair,
            "guidance": ModelSpec(pair.guidance, pair.guidance_adapter).describe(),
            "edit": ModelSpec(pair.edit, pair.edit_adapter).describe(),
            "alpha": alpha,
            "cfg": item.cfg,
            "steps": self.jobs.steps,
            "time_s": round(seconds, 4),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "process": self.process_index,
        }
        data = (json.dumps(record) + "\n").encode()
        atomic_write(self.records / f"{item.id}.json", lambda f: f.write(data))


def write_manifest(jobs: Jobs, out: Path) -> int:
    """Rebuild ``manifest.jsonl`` from the finished items' records, in item order; returns the count."""
    lines = []
    for item in jobs.items():
        record = out / "records" / f"{item.id}.json"
        if record.is_file():
            lines.append(record.read_text().strip())
    data = "".join(line + "\n" for line in lines).encode()
    atomic_write(out / "manifest.jsonl", lambda f: f.write(data))
    return len(lines)


def _process_state() -> Any | None:
    """accelerate's process state when it is installed (a single process otherwise).

    Without CUDA, processes started by ``accelerate launch`` (or torchrun) coordinate over gloo.
    """
    import torch

    try:
        from accelerate import PartialState
    except ImportError:
        return None
    return PartialState(cpu=not torch.cuda.is_available())


def run(args: argparse.Namespace) -> int:
    try:
        generated, skipped, total, out = run_batch(args)
    except (CommandError, ValueError, FileNotFoundError) as exc:
        print(f"dreamblend batch: error: {exc}", file=sys.stderr)
        return 2
    if total is not None:
        print(f"{generated} generated, {skipped} already done; {total} items in {out / 'manifest.jsonl'}")
    return 0


def run_batch(args: argparse.Namespace) -> tuple[int, int, int | None, Path]:
    """Run this process's share; the main process writes the manifest once every process is done."""
    from dreamblend.checkpoints import pipeline_class

    jobs = Jobs.load(args.jobs)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        jobs.batch_size = args.batch_size
    jobs.allow_pickle = jobs.allow_pickle or args.allow_pickle
    out = args.out or jobs.output_dir
    if out is None:
        raise CommandError("no output folder: set output_dir in the jobs file or pass --out")
    ensure_writable_dir(out)
    pipeline = pipeline_class(jobs.model)
    check_model_options(
        pipeline, negative_prompt=jobs.negative_prompt, negative_option="jobs key 'negative_prompt'"
    )
    state = _process_state()
    index, count = (state.process_index, state.num_processes) if state else (0, 1)
    device = args.device or (str(state.device) if count > 1 else None)
    device, dtype = resolve_runtime(device, args.dtype, pipeline)
    runner = BatchRunner(
        jobs,
        out,
        device=device,
        dtype=dtype,
        process_index=index,
        num_processes=count,
        progress=args.progress,
    )
    try:
        generated, skipped = runner.run()
    except BaseException:
        if count == 1:
            write_manifest(jobs, out)  # the manifest lists what finished before the failure
        raise
    if count > 1:
        state.wait_for_everyone()
    total = write_manifest(jobs, out) if index == 0 else None
    return generated, skipped, total, out
