"""``dreamblend suggest``: propose checkpoints from a run's attention collapse, or from measured scores.

SOURCE is either the output folder of 'dreamblend train' or a points table (.csv).

A run folder: every checkpoint (and the base model) samples the prompt(s); the collapse score is the
share of the context words' attention that falls on the subject token's region. E is the first
checkpoint where collapse reaches --saturation of its rise, G the latest point before it whose
collapse stays within --guidance-level of the rise (see dreamblend.analysis.collapse).

A points table (columns subject, method, guidance_step, edit_step, alpha, subject_fidelity,
prompt_fidelity and their _se errors; or the summary.csv of 'dreamblend eval'): the best operating
point of each subject and method by F1 of the two mean scores, as in the paper, and with --plots the
Fig. 7 plots.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from dreamblend.commands import help_text
from dreamblend.commands.generate import CommandError, add_runtime_arguments, resolve_runtime


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "suggest",
        help="propose G and E checkpoints (attention collapse of a run, or F1 of measured operating points)",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=Path, help="a 'dreamblend train' output folder, or a points table .csv"
    )
    run_group = parser.add_argument_group("training run")
    run_group.add_argument(
        "--prompt",
        action="append",
        help="prompt to score (repeatable); default 'a TOKEN CLASS on a cobblestone street'",
    )
    run_group.add_argument("--model", help="base model the run was trained from, if it has moved")
    run_group.add_argument("--subject", nargs="+", help="words whose map is the subject (default: the token)")
    run_group.add_argument(
        "--words", nargs="+", help="context words scored (default: the prompt's words but subject and class)"
    )
    run_group.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds per prompt (default 0)")
    run_group.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    run_group.add_argument(
        "--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)"
    )
    run_group.add_argument("--resolution", type=int, help="map size (default: a quarter of the latent size)")
    run_group.add_argument(
        "--top",
        type=float,
        help="subject region: this fraction of cells (default: cells above the map's mean)",
    )
    run_group.add_argument("--guidance-level", type=float, default=0.25, help="G's ceiling (default 0.25)")
    run_group.add_argument("--saturation", type=float, default=0.9, help="E's level (default 0.9)")
    run_group.add_argument("--no-base", action="store_true", help="do not score the base model (step 0)")
    run_group.add_argument("--plot", type=Path, help="write the collapse curve to this PNG")
    points_group = parser.add_argument_group("points table")
    points_group.add_argument("--plots", type=Path, help="write Fig. 7 plots (one per subject, average) here")
    points_group.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=HEADER",
        help="read FIELD from column HEADER, e.g. subject_fidelity=dino (repeatable)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.source.is_file() and args.source.suffix.lower() == ".csv":
            suggest_from_points(args)
        elif args.source.is_dir():
            suggest_from_run(args)
        else:
            raise CommandError(
                f"{args.source} is neither a training run folder nor a .csv points table"
                + ("" if args.source.exists() else " (it does not exist)")
            )
    except (CommandError, ValueError, FileNotFoundError) as exc:
        print(f"dreamblend suggest: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _columns(pairs: list[str]) -> Any:
    from dataclasses import fields

    from dreamblend.analysis.points import PointColumns

    names = [f.name for f in fields(PointColumns)]
    mapping = {}
    for pair in pairs:
        field, sep, header = pair.partition("=")
        if not sep or field not in names or not header:
            raise CommandError(f"--column takes FIELD=HEADER with FIELD one of {names}; got {pair!r}")
        mapping[field] = header
    return PointColumns(**mapping)


def suggest_from_points(args: argparse.Namespace) -> None:
    from dreamblend.analysis.points import best_points, pareto_front, plot_subjects, read_points

    points = read_points(args.source, _columns(args.column))
    print(f"{'subject':<16} {'method':<14} {'best by F1':<40} {'F1':>6} {'subject':>8} {'prompt':>7}  front")
    for (subject, method), best in best_points(points).items():
        front = pareto_front([p for p in points if p.subject == subject])
        on_front = "yes" if any(p is best for p in front) else "no"
        scores = f"{best.f1:>6.3f} {best.subject_fidelity:>8.3f} {best.prompt_fidelity:>7.3f}"
        print(f"{subject or '-':<16} {method:<14} {best.label:<40} {scores}  {on_front}")
    if args.plots is not None:
        for path in plot_subjects(points, args.plots):
            print(path)


def suggest_from_run(args: argparse.Namespace) -> None:
    from dreamblend.analysis.collapse import (
        FIG3_PROMPT,
        plot_collapse,
        suggest_checkpoints,
        trajectory_collapse,
    )
    from dreamblend.training.trajectory import read_trajectory

    if args.steps < 1:
        raise CommandError("--steps must be at least 1")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise CommandError(f"--plot must name a .png file, got {args.plot}")
    checkpoints = read_trajectory(args.source)
    device, dtype = resolve_runtime(args.device, args.dtype)

    def progress(point: Any) -> None:
        print(f"scored {point.name}: collapse {point.score:.3f}", file=sys.stderr, flush=True)

    points = trajectory_collapse(
        args.source,
        args.prompt,
        subject_words=args.subject,
        words=args.words,
        base_model=args.model,
        include_base=not args.no_base,
        seeds=args.seeds,
        top=args.top,
        device=device,
        torch_dtype=dtype,
        allow_pickle=args.allow_pickle,
        report=progress,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        resolution=args.resolution,
    )
    choice = suggest_checkpoints(points, guidance_level=args.guidance_level, saturation=args.saturation)
    print(f"{'step':>6}  {'checkpoint':<20} {'collapse':>8} {'level':>6} {'region':>7}")
    for point, level in zip(points, choice.levels, strict=True):
        mark = " <- G" if point is choice.guidance else " <- E" if point is choice.edit else ""
        print(
            f"{point.step:>6}  {point.name:<20} {point.score:>8.3f} {level:>6.0%} {point.region:>7.2f}{mark}"
        )
    print(f"G: {choice.guidance.name} (step {choice.guidance.step}): {choice.why_guidance}")
    print(f"E: {choice.edit.name} (step {choice.edit.step}): {choice.why_edit}")
    first = checkpoints[0]
    prompt = (
        args.prompt[0]
        if args.prompt
        else FIG3_PROMPT.format(token=first.token, **{"class": first.class_word})
    )
    command = ["dreamblend", "generate", prompt, "--model", args.model or first.base_model]
    if choice.guidance.path is not None:
        command += ["--guidance-model", str(choice.guidance.path)]
    command += ["--edit-model", str(choice.edit.path)]
    print("try: " + shlex.join(command))
    if args.plot is not None:
        print(
            plot_collapse(
                points, args.plot, suggestion=choice, title=f"attention collapse: {args.source.name}"
            )
        )
