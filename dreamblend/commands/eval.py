"""``dreamblend eval MANIFEST``: score every image of a ``dreamblend batch`` run, resumably.

Output folder (default: ``eval/`` beside the manifest):

- ``scores.jsonl``: one row per image, appended and flushed as soon as the image is scored; a rerun
  scores only the images without a row (rows holding an ``error`` are retried);
- ``scores.csv``: the same rows as a table in manifest order, the latest row per image;
- ``summary.csv`` / ``summary.json``: per subject and operating point (pair, guidance, edit, alpha,
  cfg): each metric's mean, standard error and count;
- ``errors.jsonl``: the images that could not be scored and why;
- ``eval.json``: the options the scores depend on; a rerun with different ones is refused.

Tables are rebuilt (atomically) whenever a run ends, also when it fails or is interrupted.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamblend.commands import help_text
from dreamblend.commands.generate import CommandError, atomic_write, ensure_writable_dir

EPILOG = """\
Metrics (higher is better): dino, clip_i = mean cosine similarity to the subject's real images (DINO
ViT-S/16 CLS token, CLIP ViT-B/32 image embedding); clip_t = cosine similarity of the image and its
prompt without the rare token; diversity = mean DINO distance (1 - cosine) to the other images of
the same prompt and operating point; mdino, mclip_i = dino, clip_i with both sides masked to the
subject (CLIPSeg on the class noun after the token, or --masks/--reference-masks).

--references is one subject's folder of photos, or a benchmark root holding <subject>/NN.jpg. With a
root, each image's subject is --subject, else the manifest row's "subject", else the subject folder
whose class (DreamBooth table, or the folder name) follows the rare token in the prompt, if only one
does.
"""

OPERATING_POINT = ("pair", "guidance", "edit", "alpha", "cfg")
ROW_FIELDS = ("id", "file", "subject", "prompt", "seed", *OPERATING_POINT)
DEFAULT_BATCH_SIZE = 32


def _model_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=MODEL (e.g. clip=models/clip), got {text!r}")
    return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a batch run's images (DINO, CLIP-I, CLIP-T, diversity, ...), resumably",
        description=help_text(__doc__.splitlines()[0]),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("manifest", type=Path, help="a batch run's manifest.jsonl, or its output folder")
    add("--references", type=Path, required=True, metavar="DIR", help="subject folder or benchmark root")
    add("--subject", metavar="NAME", help="subject of every image (a folder name under a benchmark root)")
    add(
        "--metrics",
        nargs="+",
        metavar="NAME",
        help="metrics to compute (default: dino clip_i clip_t diversity; also built in: mdino mclip_i)",
    )
    add(
        "--metrics-from",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first; it adds metrics with dreamblend.metrics.register_metric",
    )
    add("--token", default="sks", help="rare token of the prompts, removed for clip_t (default sks)")
    add(
        "--class-word",
        metavar="WORD",
        help="subject class for the masked metrics (default: the word after --token)",
    )
    add(
        "--masks",
        type=Path,
        metavar="DIR",
        help="mask PNGs (white = subject) of the run's images, named as they are",
    )
    add(
        "--reference-masks",
        type=Path,
        metavar="DIR",
        help="mask PNGs mirroring --references (<subject>/NN.png)",
    )
    add("--out", type=Path, metavar="DIR", help="output folder (default: eval/ next to the manifest)")
    add(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="images per forward (default 32)",
    )
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    models = parser.add_argument_group("models (hub id or local folder)").add_argument
    models(
        "--model-clip",
        metavar="ID",
        help="CLIP for clip_i, clip_t, mclip_i (default openai/clip-vit-base-patch32)",
    )
    models(
        "--model-dino", metavar="ID", help="DINO for dino, diversity, mdino (default facebook/dino-vits16)"
    )
    models(
        "--model-clipseg", metavar="ID", help="masked metrics' segmenter (default CIDAS/clipseg-rd64-refined)"
    )
    models("--model", type=_model_override, action="append", default=[], metavar="KEY=ID",
           help="model for a registered metric's KEY")  # fmt: skip
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Entry:
    """One manifest row to score: its image, prompt, subject and the operating point it was made at."""

    row: dict[str, Any]
    image: Path
    subject: str | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[Any, str]:
        return self.row.get("id"), self.row["file"]

    @property
    def prompt(self) -> str:
        return self.row["prompt"]

    @property
    def operating_point(self) -> tuple[Any, ...]:
        return tuple(self.row.get(k) for k in OPERATING_POINT)

    def output(self, scores: dict[str, float | None], error: str | None) -> dict[str, Any]:
        return {**{k: self.row.get(k) for k in ROW_FIELDS}, "subject": self.subject, **scores, "error": error}


def read_manifest(path: Path) -> tuple[Path, list[Entry]]:
    """The manifest file and its rows; images are relative to its folder. Malformed lines are refused."""
    path = path / "manifest.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise CommandError(f"manifest {path} does not exist; give a batch run's manifest.jsonl or its folder")
    entries: list[Entry] = []
    seen: dict[tuple[Any, str], int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{path} line {number} is not JSON ({exc}); fix or remove the line") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("file", "prompt")):
            raise CommandError(
                f"{path} line {number} needs string fields 'file' and 'prompt', as batch writes"
            )
        entry = Entry(row, path.parent / row["file"])
        if entry.key in seen:
            raise CommandError(
                f"{path} line {number} repeats the image of line {seen[entry.key]}; remove one"
            )
        seen[entry.key] = number
        entries.append(entry)
    return path, entries


class References:
    """The subject's real photos: ``--references`` is one subject's folder or a root of subject folders."""

    def __init__(self, path: Path, *, subject: str | None, token: str | None, masks: Path | None) -> None:
        from dreamblend.benchmark import list_subjects
        from dreamblend.training.data import IMAGE_SUFFIXES

        if not path.is_dir():
            raise CommandError(
                f"--references {path} is not a folder; give a subject's photos or a benchmark root"
            )
        self.path, self.subject, self.token, self.masks = path, subject, token, masks
        images = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        subjects = list_subjects(path)
        # photos (or nothing at all: the empty folder of one subject) make it one subject's folder
        self.subjects = None if images or not subjects else subjects
        self._photos: dict[str, list[Any] | str] = {}

    def subject_of(self, row: dict[str, Any]) -> str:
        """The subject a manifest row is scored against; ValueError when it cannot be told."""
        from dreamblend.benchmark import SUBJECT_CLASSES, class_in_prompt

        named = self.subject or row.get("subject")
        if self.subjects is None:  # one subject's folder
            label = self.subject or self.path.name
            if row.get("subject") not in (None, label):
                raise ValueError(
                    f"the row's subject {row['subject']!r} is not {label!r}, the one subject --references "
                    "holds; give the benchmark root instead"
                )
            return label
        if named:
            return str(named)
        classes = {s: SUBJECT_CLASSES.get(s, s.replace("_", " ")) for s in self.subjects}
        noun = class_in_prompt(row["prompt"], self.token, classes.values())
        matches = [s for s, c in classes.items() if c == noun]
        if len(matches) != 1:
            found = f"subjects {matches} all have" if matches else f"no subject under {self.path} has"
            raise ValueError(
                f"cannot tell the subject of {row['prompt']!r}: {found} class {noun!r}; pass --subject or "
                "give the row a 'subject'"
            )
        return matches[0]

    def photos(self, subject: str) -> list[Any]:
        """The subject's photos (with their masks as alpha when --reference-masks is given), loaded once."""
        if subject not in self._photos:
            try:
                self._photos[subject] = self._load(subject)
            except ValueError as exc:
                self._photos[subject] = str(exc)
        photos = self._photos[subject]
        if isinstance(photos, str):
            raise ValueError(photos)
        return photos

    def _load(self, subject: str) -> list[Any]:
        from dreamblend.benchmark import subject_photos
        from dreamblend.training.data import list_images

        paths = (
            list_images(self.path, flag="--references")
            if self.subjects is None
            else subject_photos(self.path, subject)
        )
        return [load_with_mask(p, self.path, self.masks) for p in paths]


def load_with_mask(path: Path, root: Path, masks: Path | None) -> Any:
    """The image at ``path``; with ``masks``, its mask: the same place under ``masks`` as under ``root``."""
    from dreamblend.benchmark import load_image
    from dreamblend.metrics.masking import with_mask

    image = load_image(path)
    return image if masks is None else with_mask(image, masks / path.relative_to(root).with_suffix(".png"))


# ---------------------------------------------------------------------------------------------- outputs


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class ScoreLog:
    """``scores.jsonl``: rows appended and flushed one by one; the latest row per image wins on reading."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[Any, str], dict[str, Any]] = {}
        if path.is_file():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):  # a run killed mid-write: drop the partial row, redo that image
                with path.open("r+b") as handle:
                    handle.truncate(len(complete))
            for number, line in enumerate(complete.decode().splitlines(), start=1):
                try:
                    row = json.loads(line)
                    self.rows[(row.get("id"), row["file"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise CommandError(
                        f"{path} line {number} is not a score row; remove it (its image is scored again)"
                    ) from None
        self._handle = path.open("a", encoding="utf-8")

    def is_scored(self, entry: Entry) -> bool:
        row = self.rows.get(entry.key)
        return row is not None and row.get("error") is None

    def append(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        self.rows[(row.get("id"), row["file"])] = row

    def close(self) -> None:
        self._handle.close()


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))


def _write_json(path: Path, value: Any) -> None:
    data = (json.dumps(value, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per (subject, operating point): image count and each metric's mean, standard error and count.

    A metric's NaN values (diversity of a lone image) are left out of its mean; the standard error is
    the sample standard deviation over sqrt(n), None for fewer than two values.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("error") is None:
            groups.setdefault((row["subject"], *(row.get(k) for k in OPERATING_POINT)), []).append(row)
    summary = []
    for key, members in groups.items():
        out: dict[str, Any] = {"subject": key[0], **dict(zip(OPERATING_POINT, key[1:], strict=True))}
        out["images"] = len(members)
        for name in metrics:
            values = np.array([r[name] for r in members if r.get(name) is not None], dtype=np.float64)
            out[f"{name}_mean"] = float(values.mean()) if values.size else None
            out[f"{name}_se"] = (
                float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else None
            )
            out[f"{name}_n"] = int(values.size)
        summary.append(out)
    return summary


def write_tables(out: Path, entries: Sequence[Entry], log: ScoreLog, metrics: Sequence[Any]) -> list[dict]:
    """Rebuild scores.csv, summary.csv/json and errors.jsonl from the log; returns the error rows."""
    names = [m.name for m in metrics]
    rows = [log.rows[e.key] for e in entries if e.key in log.rows]
    _write_csv(out / "scores.csv", rows, [*ROW_FIELDS, *names, "error"])
    summary = summarize(rows, names)
    stats = [f"{n}_{s}" for n in names for s in ("mean", "se", "n")]
    _write_csv(out / "summary.csv", summary, ["subject", *OPERATING_POINT, "images", *stats])
    _write_json(out / "summary.json", {"metrics": {m.name: m.role for m in metrics}, "groups": summary})
    errors = [r for r in rows if r.get("error") is not None]
    data = "".join(
        json.dumps({k: r.get(k) for k in ("id", "file", "subject", "error")}) + "\n" for r in errors
    )
    atomic_write(out / "errors.jsonl", lambda f: f.write(data.encode()))
    return errors


# ---------------------------------------------------------------------------------------------- scoring


def _units(entries: Sequence[Entry]) -> list[list[Entry]]:
    """Images of one subject, operating point and prompt: the set diversity is measured within."""
    units: dict[tuple[Any, ...], list[Entry]] = {}
    for entry in entries:
        units.setdefault((entry.subject, entry.operating_point, entry.prompt), []).append(entry)
    return list(units.values())


def _chunks(units: list[list[Entry]], log: ScoreLog, size: int) -> Iterator[list[list[Entry]]]:
    """Consecutive units of one subject with at least ``size`` unscored images (the last may have fewer)."""
    chunk: list[list[Entry]] = []
    todo = 0
    for unit in units:
        missing = sum(not log.is_scored(e) for e in unit)
        if not missing:
            continue
        if chunk and (todo >= size or chunk[0][0].subject != unit[0].subject):
            yield chunk
            chunk, todo = [], 0
        chunk.append(unit)
        todo += missing
    if chunk:
        yield chunk


class Scorer:
    """Scores chunks of units and appends one row per unscored image."""

    def __init__(self, metrics: Sequence[Any], references: References, masks: Path | None, run: Path) -> None:
        self.references, self.masks, self.run = references, masks, run
        self.diversity = [m for m in metrics if m.role == "diversity"]
        self.per_image = [m for m in metrics if m.role != "diversity"]

    def score(self, chunk: list[list[Entry]], log: ScoreLog, bar: Any) -> None:
        entries = [e for unit in chunk for e in unit]
        todo = [e for e in entries if not log.is_scored(e)]
        images: dict[tuple, Any] = {}
        errors: dict[tuple, str] = {}
        for entry in entries if self.diversity else todo:  # diversity compares with scored images too
            try:
                images[entry.key] = load_with_mask(entry.image, self.run, self.masks)
            except ValueError as exc:
                errors[entry.key] = str(exc)
        scores: dict[tuple, dict[str, float | None]] = {e.key: {} for e in todo}
        try:
            references = self.references.photos(chunk[0][0].subject)
            self._per_image(todo, images, references, scores)
            for unit in chunk:
                self._diversity(unit, images, references, scores)
        except ValueError as exc:  # bad references or prompts: every image of the chunk reports it
            errors = {e.key: errors.get(e.key, str(exc)) for e in todo}
        for entry in todo:
            error = errors.get(entry.key)
            log.append(entry.output({} if error else scores[entry.key], error))
            bar.update()

    def _per_image(self, todo: list[Entry], images: dict, references: list, scores: dict) -> None:
        ready = [e for e in todo if e.key in images]
        for metric in self.per_image:
            values = metric.score([images[e.key] for e in ready], [e.prompt for e in ready], references)
            for entry, value in zip(ready, values, strict=True):
                scores[entry.key][metric.name] = _finite(value)

    def _diversity(self, unit: list[Entry], images: dict, references: list, scores: dict) -> None:
        members = [e for e in unit if e.key in images]
        for metric in self.diversity:
            values = metric.score([images[e.key] for e in members], [e.prompt for e in members], references)
            for entry, value in zip(members, values, strict=True):
                if entry.key in scores:
                    scores[entry.key][metric.name] = _finite(value)


def run(args: argparse.Namespace) -> int:
    try:
        scored, skipped, errors, out = evaluate(args)
    except (CommandError, ValueError, FileNotFoundError) as exc:
        print(f"dreamblend eval: error: {exc}", file=sys.stderr)
        return 2
    problems = f"; {len(errors)} could not be scored (see {out / 'errors.jsonl'})" if errors else ""
    print(f"{scored} images scored, {skipped} already scored{problems}; tables in {out}")
    return 1 if errors else 0


def _config(args: argparse.Namespace, manifest: Path, metrics: Sequence[str], models: dict[str, str]) -> dict:
    """The options the scores depend on (not device or batch size)."""
    path = lambda p: None if p is None else str(p.resolve())
    return {
        "manifest": path(manifest),
        "references": path(args.references),
        "subject": args.subject,
        "metrics": list(metrics),
        "models": models,
        "token": args.token,
        "class_word": args.class_word,
        "masks": path(args.masks),
        "reference_masks": path(args.reference_masks),
    }


def _check_config(out: Path, config: dict[str, Any]) -> None:
    """Refuse an output folder whose scores were made with other options."""
    path = out / "eval.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in config if previous.get(k) != config[k])
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} then, {config[k]!r} now" for k in changed)
            raise CommandError(
                f"{out} holds scores made with other options ({details}); rerun with the same options or "
                "choose another --out"
            )


def evaluate(args: argparse.Namespace) -> tuple[int, int, list[dict], Path]:
    """Score the manifest's unscored images; returns (scored now, scored before, error rows, out)."""
    from tqdm.auto import tqdm

    from dreamblend.metrics import DEFAULT_METRICS, DEFAULT_MODELS, build_metrics

    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    for module in args.metrics_from:
        importlib.import_module(module)
    manifest, entries = read_manifest(args.manifest)
    references = References(
        args.references, subject=args.subject, token=args.token, masks=args.reference_masks
    )
    for entry in entries:
        try:
            entry.subject = references.subject_of(entry.row)
        except ValueError as exc:
            entry.error = str(exc)
    names = args.metrics or list(DEFAULT_METRICS)
    overrides = {"clip": args.model_clip, "dino": args.model_dino, "clipseg": args.model_clipseg}
    models = {**{k: v for k, v in overrides.items() if v}, **dict(args.model)}
    out = ensure_writable_dir(args.out or manifest.parent / "eval")
    config = _config(args, manifest, names, {**DEFAULT_MODELS, **models})
    _check_config(out, config)
    metrics = build_metrics(
        names,
        device=args.device,
        batch_size=args.batch_size,
        models=models,
        token=args.token,
        class_word=args.class_word,
        segment=not (args.masks and args.reference_masks),
    )
    _write_json(out / "eval.json", config)  # once the metrics exist: they are what the scores depend on
    log = ScoreLog(out / "scores.jsonl")
    skipped = sum(log.is_scored(e) for e in entries)
    scorer = Scorer(metrics, references, args.masks, manifest.parent)
    try:
        with tqdm(
            total=len(entries), initial=skipped, desc="dreamblend eval", unit="img", disable=not args.progress
        ) as bar:
            for entry in entries:
                if entry.error is not None:
                    log.append(entry.output({}, entry.error))
                    bar.update()
            ready = [e for e in entries if e.error is None]
            for chunk in _chunks(_units(ready), log, args.batch_size):
                scorer.score(chunk, log, bar)
    finally:
        log.close()
        errors = write_tables(out, entries, log, metrics)
    return len(entries) - skipped - len(errors), skipped, errors, out
