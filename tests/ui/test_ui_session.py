"""The web app's run logic on the shipped toy model: a blend, its command line, stopping, the sweep."""

from __future__ import annotations

import shlex
import threading
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dreamblend.cli import main
from dreamblend.ui.session import Stopped, map_tiles
from dreamblend.ui.settings import SettingsError

LABELS = ("G (guidance)", "E alone", "DreamBlend")


@pytest.fixture(scope="module")
def first(toy_session):
    """One blend with the app's defaults (few steps), shared by the checks below."""
    return toy_session.blend(toy_session.config.defaults)


def test_a_blend_gives_three_images_their_word_maps_and_scores(toy_session, first):
    words = toy_session.config.defaults.words
    assert [row.label for row in first.rows] == list(LABELS)
    for row in first.rows:
        assert row.image.shape == (64, 64, 3) and row.image.dtype == np.uint8
        assert row.words == words and row.maps.shape == (len(words), 8, 8)  # the toy's 8x8 maps
        assert np.isfinite(row.maps.numpy()).all() and row.image.std() > 0
    # Guidance changes E's image: DreamBlend is not E alone.
    assert np.abs(first.image("DreamBlend").astype(int) - first.image("E alone")).max() > 0
    assert set(first.scores) == set(toy_session.config.metrics) and first.score_note == ""
    assert all(set(values) == set(LABELS) for values in first.scores.values())
    tiles = map_tiles(first.rows, size=96)
    assert [caption for _, caption in tiles] == [f"{label}: {w}" for label in LABELS for w in words]
    assert all(tile.shape == (96, 96, 3) for tile, _ in tiles)


def test_the_copied_command_reproduces_the_blend(toy_session, first, tmp_path, capsys):
    """The "copy as command" line, run through the CLI in-process, draws the same images.

    Same seed, pipeline, device and dtype. The page's run also records every word map, which sends
    attention through the capturing path: in float32 its images differ from a plain call by about 2e-4
    (measured on the toy model), so a pixel can round to the neighbouring uint8 level: 1 level allowed.
    """
    argv = shlex.split(first.command)
    assert argv[:2] == ["dreamblend", "generate"]
    out = tmp_path / "blend.png"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv[1:]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "blend_reference.png")]
    for path, label in ((out, "DreamBlend"), (tmp_path / "blend_reference.png", "G (guidance)")):
        image = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert np.abs(image - first.image(label)).max() <= 1, label


def test_stop_ends_a_run_and_the_next_run_matches_an_uninterrupted_one(toy_session, first):
    stopped_at: list[int] = []

    def stop_after_first_step(done: int, total: int) -> None:
        if not stopped_at:
            stopped_at.append(done)
            assert toy_session.stop()

    with pytest.raises(Stopped):
        toy_session.blend(toy_session.config.defaults, progress=stop_after_first_step)
    assert stopped_at == [1]
    assert not toy_session.stop()  # nothing runs any more
    seen: list[tuple[int, int]] = []
    again = toy_session.blend(
        toy_session.config.defaults, progress=lambda done, total: seen.append((done, total))
    )
    steps = toy_session.config.defaults.steps
    assert seen == [(i, 2 * steps) for i in range(1, 2 * steps + 1)]  # blend + E alone
    for label in LABELS:
        np.testing.assert_array_equal(again.image(label), first.image(label))


def test_stop_from_another_thread_while_sampling(toy_session):
    """As the page does it: Stop arrives on another thread while the run holds the session."""
    started = threading.Event()

    def signal(done: int, total: int) -> None:
        started.set()
        threading.Event().wait(0.05)  # give the stopping thread time to act mid-run

    errors: list[BaseException] = []

    def run() -> None:
        try:
            toy_session.blend(replace(toy_session.config.defaults, steps=20), progress=signal)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(120)
    assert toy_session.stop()
    worker.join(120)
    assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], Stopped)


def test_bad_input_is_reported_before_sampling_and_the_session_stays_usable(toy_session, first, tmp_path):
    defaults = toy_session.config.defaults
    calls: list[int] = []
    with pytest.raises(SettingsError, match="tokens long"):
        toy_session.blend(replace(defaults, prompt="a sks cube " * 40), progress=lambda d, t: calls.append(d))
    with pytest.raises(SettingsError, match="does not exist"):
        toy_session.blend(replace(defaults, guidance=str(tmp_path / "checkpoint-7")))
    assert calls == []
    again = toy_session.blend(defaults)
    np.testing.assert_array_equal(again.image("DreamBlend"), first.image("DreamBlend"))


def test_words_not_in_the_prompt_are_named_before_sampling(toy_session):
    calls: list[int] = []
    with pytest.raises(ValueError, match="jungle"):
        toy_session.blend(
            replace(toy_session.config.defaults, words=("sks", "jungle")),
            progress=lambda d, t: calls.append(d),
        )
    assert calls == []


def test_a_prompt_outside_the_toy_grammar_runs_without_scores(toy_session):
    result = toy_session.blend(replace(toy_session.config.defaults, prompt="sks", words=()))
    assert [row.words for row in result.rows] == [("sks",)] * 3  # no words picked: every word
    assert result.scores == {} and result.score_note.startswith("scores unavailable")


def test_the_alpha_sweep_matches_the_blend_at_its_alpha_and_e_alone_at_zero(toy_session, first):
    """Same seed, same call: the sweep's image at the run's alpha is the DreamBlend image and alpha 0 is E
    alone (1 uint8 level allowed: the sweep records no maps, see the command test above)."""
    alpha = toy_session.config.defaults.alpha
    strip = toy_session.sweep(toy_session.config.defaults, [0.0, alpha])
    assert [a for a, _ in strip] == [0.0, alpha]
    assert np.abs(strip[0][1].astype(int) - first.image("E alone")).max() <= 1
    assert np.abs(strip[1][1].astype(int) - first.image("DreamBlend")).max() <= 1


def test_an_app_on_a_given_model_runs_without_metrics_and_reads_the_default_map_size(toy_session):
    """``dreamblend ui --model ...``: no toy defaults, so no metrics and maps at a quarter of the latent."""
    from dreamblend.cli import build_parser
    from dreamblend.commands.ui import app_config
    from dreamblend.ui.session import BlendSession

    toy = toy_session.config
    args = [
        "ui",
        "--model",
        toy.model,
        "--guidance-model",
        toy.defaults.guidance,
        "--edit-model",
        toy.defaults.edit,
    ]
    config = app_config(build_parser().parse_args([*args, "--prompt", "a sks cube on the grass"]))
    assert config.metrics == () and config.map_resolution is None and config.choices == toy.choices
    session = BlendSession(config)
    result = session.blend(replace(config.defaults, steps=2))
    assert result.scores == {} and "no metrics configured" in result.score_note
    assert [row.words for row in result.rows] == [("a", "sks", "cube", "on", "the", "grass")] * 3
    assert result.rows[0].maps.shape[1:] == (4, 4)  # 16x16 latents: the 4x4 layers
    assert result.command.startswith(f"dreamblend generate 'a sks cube on the grass' --model {toy.model} ")


def test_a_lora_of_another_shape_is_refused_and_the_session_stays_usable(toy_session, first, tmp_path):
    """A LoRA whose matrices do not fit the base UNet (here: widened down-projections)."""
    import torch
    from safetensors.torch import load_file, save_file

    defaults = toy_session.config.defaults
    weights = load_file(f"{defaults.guidance}/pytorch_lora_weights.safetensors")
    foreign = tmp_path / "foreign_lora.safetensors"
    save_file(
        {k: torch.zeros(v.shape[0], v.shape[1] + 3) if ".down." in k else v for k, v in weights.items()},
        foreign,
    )
    with pytest.raises(
        SettingsError, match=r"do not fit the base model .*size mismatch .*fine-tuned from this base"
    ):
        toy_session.blend(replace(defaults, guidance=str(foreign)))
    again = toy_session.blend(defaults)
    np.testing.assert_array_equal(again.image("DreamBlend"), first.image("DreamBlend"))
