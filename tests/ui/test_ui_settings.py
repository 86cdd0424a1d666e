"""The web app's input checks and its "copy as command" line, without models or a browser."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from dreamblend.cli import build_parser
from dreamblend.ui.settings import (
    BlendSettings,
    SettingsError,
    check_numbers,
    check_pair,
    check_prompt,
    generate_argv,
    generate_command,
    parse_alphas,
    toy_config,
    trajectory_choices,
)


@pytest.fixture(scope="module")
def config():
    return toy_config()


def test_toy_config_offers_every_shipped_checkpoint_and_defaults_to_the_demo_pair(config):
    steps = [int(Path(c.path).name.split("-")[1]) for c in config.choices]
    assert steps == sorted(steps) and len(steps) >= 2
    paths = [c.path for c in config.choices]
    assert config.defaults.guidance in paths and config.defaults.edit in paths
    assert config.defaults.guidance != config.defaults.edit
    assert set(config.defaults.words) <= set(config.defaults.prompt.split())
    assert config.metrics  # the toy world's metrics score the toy model offline


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": -1}, "seed must be between"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"seed": None}, "seed must be a number"),
        ({"steps": 0}, "steps must be between 1"),
        ({"alpha": -0.1}, "alpha must be at least 0"),
        ({"alpha": float("nan")}, "alpha must be at least 0"),
        ({"cfg": float("inf")}, "CFG must be at least 0"),
        ({"guided_fraction": 1.5}, "guided steps must be between 0 and 1"),
    ],
)
def test_numbers_out_of_range_are_named(change, message):
    with pytest.raises(SettingsError, match=message):
        check_numbers(replace(BlendSettings("a sks cube"), **change))


def test_numbers_from_the_page_become_ints_where_the_pipeline_needs_them():
    checked = check_numbers(BlendSettings("a sks cube", seed=3.0, steps=15.0, cfg=3, alpha=0))
    assert (checked.seed, checked.steps) == (3, 15)
    assert isinstance(checked.seed, int) and isinstance(checked.steps, int)


def test_a_prompt_over_the_text_encoders_length_is_refused_with_its_count(toy_session):
    tokenizer = toy_session.tokenizer()
    fits = "a sks cube " * 25  # 75 words + start and end = 77 tokens
    check_prompt(tokenizer, fits.strip())
    with pytest.raises(SettingsError, match=r"the prompt is 80 tokens long, but the model reads at most 77"):
        check_prompt(tokenizer, (fits + "on the grass").strip())


def test_missing_and_identical_checkpoints_are_refused(config, tmp_path):
    with pytest.raises(SettingsError, match=r"G \(guidance\) checkpoint .*nope.* does not exist"):
        check_pair(config, str(tmp_path / "nope"), config.defaults.edit)
    with pytest.raises(SettingsError, match=r"E \(edit\) checkpoint"):
        check_pair(config, config.defaults.guidance, str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match="G and E are the same checkpoint"):
        check_pair(config, config.defaults.edit, config.defaults.edit)
    check_pair(config, config.defaults.guidance, config.defaults.edit)
    check_pair(config, None, config.defaults.edit)  # G may be the base model


def _checkpoint_from(source: str, dest: Path, base_model: str) -> str:
    """A copy of a shipped checkpoint whose manifest says it was trained from ``base_model``."""
    shutil.copytree(source, dest)
    manifest = dest / "checkpoint.json"
    data = json.loads(manifest.read_text())
    data["base_model"] = base_model
    manifest.write_text(json.dumps(data))
    return str(dest)


def test_checkpoints_of_another_base_model_are_refused(config, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(config.model, other)  # a pipeline folder that is not the app's
    foreign = _checkpoint_from(config.defaults.guidance, tmp_path / "checkpoint-50", str(other))
    with pytest.raises(SettingsError, match="G was trained from .* but E from .*one base model"):
        check_pair(config, foreign, config.defaults.edit)
    foreign_edit = _checkpoint_from(config.defaults.edit, tmp_path / "checkpoint-400", str(other))
    with pytest.raises(SettingsError, match=r"G was trained from .*other-base, but the app runs .*--model"):
        check_pair(config, foreign, foreign_edit)


def test_trajectory_choices_reads_a_run_folder(config):
    assert trajectory_choices(config.subject_folder) == list(config.choices)
    with pytest.raises(FileNotFoundError, match="trajectory.json"):
        trajectory_choices(Path(config.defaults.guidance))


def test_alphas_parse_from_commas_or_spaces_and_bad_ones_are_named():
    assert parse_alphas("0, 0.05 0.1,0.2") == [0.0, 0.05, 0.1, 0.2]
    with pytest.raises(SettingsError, match="give the sweep's alphas"):
        parse_alphas(" , ")
    with pytest.raises(SettingsError, match="every alpha of the sweep must be at least 0"):
        parse_alphas("0.1, -1")
    with pytest.raises(SettingsError, match="must be a number, got 'x'"):
        parse_alphas("0.1 x")


def test_the_command_line_parses_back_to_the_runs_settings(config):
    settings = replace(
        config.defaults,
        prompt="a sks cube on the grass, 'quoted' & $HOME",
        negative_prompt="blurry",
        seed=7,
        alpha=0.123456789012345,
        cfg=2.5,
        guided_fraction=0.35,
    )
    assert generate_command(config, settings).startswith("dreamblend generate ")
    args = build_parser().parse_args(generate_argv(config, settings, out="x.png"))
    assert args.command == "generate"
    assert args.prompt == settings.prompt and args.negative_prompt == "blurry"
    assert (args.model, args.guidance_model, args.edit_model) == (
        config.model,
        settings.guidance,
        settings.edit,
    )
    assert (args.seed, args.steps, args.cfg, args.alpha) == (7, settings.steps, 2.5, settings.alpha)
    assert args.guidance_steps == (0.0, 0.35)
    assert (args.device, args.dtype, str(args.out), args.save_reference) == ("cpu", "float32", "x.png", True)
    every_step = build_parser().parse_args(generate_argv(config, config.defaults))
    assert every_step.guidance_steps is None


def test_the_command_line_sets_up_the_app(config):
    from dreamblend.commands.ui import app_config

    g, e = (c.path for c in config.choices[::3][:2])
    args = build_parser().parse_args(
        ["ui", "--guidance-model", g, "--edit-model", e, "--prompt", "a sks cube"]
    )
    setup = app_config(args)
    assert (setup.defaults.guidance, setup.defaults.edit, setup.defaults.prompt) == (g, e, "a sks cube")
    assert setup.choices == config.choices  # the run holding G
    assert (setup.model, setup.metrics) == (config.model, config.metrics)


def test_the_command_refuses_bad_start_up_arguments_with_exit_code_2(tmp_path, capsys):
    from dreamblend.cli import main

    assert main(["ui", "--guidance-model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["ui", "--references", str(tmp_path)]) == 2
    assert "is not a folder of subject photos" in capsys.readouterr().err
