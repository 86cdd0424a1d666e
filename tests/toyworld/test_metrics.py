"""The toy world's metrics: known answers on renders, registry names, shipped weights, fresh validation.

The metrics modules are imported by fixtures, not at collection: importing registers the toy metrics,
and tests elsewhere in the same session check the list of built-in metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from dreamblend.metrics import available_metrics, build_metrics
from dreamblend.toyworld import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    SUBJECTS,
    CaptionFacts,
    ToyWorldDataset,
    compose_caption,
    instance_images,
    make_sample,
    render,
    subject_set,
)


@pytest.fixture(scope="module")
def toy() -> ModuleType:
    return importlib.import_module("dreamblend.toyworld.metrics")


@pytest.fixture(scope="module")
def tm() -> ModuleType:
    return importlib.import_module("dreamblend.toyworld.train_metrics")


@pytest.fixture(scope="module")
def model(toy):
    return toy.WorldModel.from_folder()


@pytest.fixture(scope="module")
def base_samples():
    dataset = ToyWorldDataset(seed=4242, length=24)
    return [dataset.sample(i) for i in range(len(dataset))]


def pil(sample) -> Image.Image:
    return Image.fromarray(sample.rendered.image)


def other(values: tuple[str, ...], value: str) -> str:
    return values[(values.index(value) + 1) % len(values)]


def test_import_registers_every_toy_metric_with_its_role(toy):
    toy.register_toy_metrics()  # a second registration replaces the first, no error
    assert set(toy.TOY_METRICS) <= set(available_metrics())
    metrics = build_metrics(list(toy.TOY_METRICS), device="cpu")
    assert [m.name for m in metrics] == list(toy.TOY_METRICS)
    roles = {m.name: m.role for m in metrics}
    assert roles["toy_subject"] == "subject" and roles["toy_prompt"] == "prompt"
    assert roles["toy_diversity"] == "diversity"
    assert [m.name for m in metrics if m.needs_references] == ["toy_subject"]
    assert len({id(m.model) for m in metrics}) == 1  # one encoder loaded for all of them


def test_models_key_overrides_the_shipped_weights(toy, tmp_path, base_samples):
    with pytest.raises(FileNotFoundError, match="train_metrics"):
        build_metrics(["toy_prompt"], device="cpu", models={"toy_world": str(tmp_path / "none")})
    shutil.copytree(toy.DEFAULT_WEIGHTS, tmp_path / "copy")
    (copied,) = build_metrics(["toy_prompt"], device="cpu", models={"toy_world": str(tmp_path / "copy")})
    (shipped,) = build_metrics(["toy_prompt"], device="cpu")
    images, prompts = [pil(s) for s in base_samples[:4]], [s.caption for s in base_samples[:4]]
    np.testing.assert_array_equal(copied.score(images, prompts), shipped.score(images, prompts))


def test_shipped_weights_are_small_and_record_a_passing_validation(tm, toy):
    folder = toy.DEFAULT_WEIGHTS
    weights = folder / "model.safetensors"
    record = json.loads((folder / "training.json").read_text())
    assert weights.stat().st_size < 2_000_000
    assert record["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    encoder = toy.WorldEncoder.load(folder)
    assert record["parameters"] == sum(p.numel() for p in encoder.parameters()) < 1_000_000
    validation = record["validation"]
    assert validation["passed"] and validation["clean"]["minimum"] >= tm.THRESHOLD
    assert validation["clean"]["identification"]["reference_sets"] == 2 * len(SUBJECTS)


def test_weights_for_other_labels_are_refused(toy, tmp_path):
    shutil.copytree(toy.DEFAULT_WEIGHTS, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["labels"]["class"] = config["labels"]["class"][:-1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="retrain"):
        toy.WorldEncoder.load(tmp_path)


def test_prompt_fidelity_is_the_fraction_of_facts_an_image_shows(toy, model, base_samples):
    """All three facts right scores near 1, one of three wrong near 2/3, all wrong near 0."""
    metric = toy.ToyPromptFidelity(model)
    images = [pil(s) for s in base_samples]

    def captions(wrong: set[str]) -> list[str]:
        out = []
        for sample in base_samples:
            scene = sample.scene
            facts = CaptionFacts(
                other(CLASSES, scene.cls) if "cls" in wrong else scene.cls,
                other(COLOURS, scene.colour) if "colour" in wrong else scene.colour,
                other(BACKGROUNDS, scene.background) if "background" in wrong else scene.background,
            )
            out.append(compose_caption(facts))
        return out

    right = metric.score(images, [s.caption for s in base_samples])
    assert right.dtype == np.float64 and right.shape == (len(images),)
    assert right.mean() > 0.9
    for fact in ("cls", "colour", "background"):
        one_wrong = metric.score(images, captions({fact}))
        assert np.all(one_wrong < right)
        assert abs(one_wrong.mean() - 2 / 3) < 0.1
    assert metric.score(images, captions({"cls", "colour", "background"})).mean() < 0.1


def test_subject_prompts_count_class_and_background_only(toy, model):
    subject = SUBJECTS[0]
    sample = subject_set(subject, 1, seed=9)[0]
    scene = sample.scene
    metric = toy.ToyPromptFidelity(model)

    def prompt(cls: str, background: str, subject_token: bool = True) -> str:
        return compose_caption(CaptionFacts(cls, None, background, subject_token), photo=False)

    own = prompt(scene.cls, scene.background)
    scores = metric.score(
        [pil(sample)] * 4,
        [
            own,
            prompt(scene.cls, scene.background, subject_token=False),
            prompt(other(CLASSES, scene.cls), scene.background),
            prompt(scene.cls, other(BACKGROUNDS, scene.background)),
        ],
    )
    assert scores[0] > 0.9 and scores[0] == scores[1]
    assert scores[2] < scores[0] - 0.3 and scores[3] < scores[0] - 0.3


def test_fact_accuracies_are_nan_where_the_prompt_names_nothing(toy, model, base_samples):
    sample = base_samples[0]
    scene = sample.scene
    images = [pil(sample)] * 3
    prompts = [
        compose_caption(CaptionFacts(scene.cls, scene.colour, scene.background)),
        compose_caption(CaptionFacts(other(CLASSES, scene.cls), other(COLOURS, scene.colour))),
        f"a photo of sks {scene.cls}",
    ]
    for metric, expected in (
        (toy.ToyClassAccuracy(model), [1.0, 0.0, 1.0]),
        (toy.ToyColourAccuracy(model), [1.0, 0.0, np.nan]),
        (toy.ToyBackgroundAccuracy(model), [1.0, np.nan, np.nan]),
    ):
        np.testing.assert_array_equal(metric.score(images, prompts), expected)


def test_subject_similarity_prefers_the_subject_over_others_and_its_plain_look_alike(toy, model):
    metric = toy.ToySubjectSimilarity(model)
    references = {s.name: [pil(x) for x in instance_images(s, 5, seed=0)] for s in SUBJECTS}
    for subject in SUBJECTS:
        tests = subject_set(subject, 6, seed=31)
        images = [pil(s) for s in tests]
        plain = [pil(make_sample(dataclasses.replace(s.scene, pattern=None), s.caption)) for s in tests]
        prompts = [subject.instance_prompt] * len(images)
        own = metric.score(images, prompts, references[subject.name])
        assert own.mean() > 0.7
        for name, refs in references.items():
            if name != subject.name:
                assert np.all(metric.score(images, prompts, refs) < own)
        assert np.all(metric.score(plain, prompts, references[subject.name]) < own - 0.2)


def test_subject_similarity_barely_depends_on_the_reference_photos_setting(toy, model):
    """Unlike DINO, copying the instance photos' room earns almost nothing."""
    metric = toy.ToySubjectSimilarity(model)
    for subject in SUBJECTS:
        references = [pil(x) for x in instance_images(subject, 5, seed=0)]
        tests = subject_set(subject, 16, seed=12)
        scores = metric.score([pil(s) for s in tests], [subject.instance_prompt] * 16, references)
        home = np.array([s.scene.background in subject.homes for s in tests])
        assert home.any() and (~home).any()
        assert abs(scores[home].mean() - scores[~home].mean()) < 0.05


def test_diversity_grows_with_what_varies_between_images(toy, model):
    metric = toy.ToyDiversity(model)
    rng = np.random.default_rng(5)
    dataset = ToyWorldDataset(seed=77, length=1)
    scene = dataset.describe(0)[0]
    prompt = compose_caption(scene.facts())
    still = [
        pil(make_sample(dataclasses.replace(scene, light=float(rng.uniform(-1, 1))), prompt))
        for _ in range(6)
    ]
    moved = [
        Image.fromarray(
            render(
                dataclasses.replace(
                    scene,
                    x=float(rng.uniform(0.32, 0.68)),
                    size=float(rng.uniform(0.18, 0.28)),
                    yaw=float(rng.uniform(0, 6.28)),
                    background_seed=int(rng.integers(2**31)),
                )
            ).image
        )
        for _ in range(6)
    ]
    copies = metric.score([still[0]] * 4, [prompt] * 4)
    np.testing.assert_allclose(copies, 0.0, atol=1e-9)
    assert metric.score(moved, [prompt] * 6).mean() > 2 * metric.score(still, [prompt] * 6).mean()
    together = metric.score(still + moved, [prompt] * 6 + ["another prompt"] * 6)
    np.testing.assert_allclose(together[:6], metric.score(still, [prompt] * 6))
    assert np.isnan(metric.score(still[:1], [prompt])).all()


def test_inputs_are_checked_and_any_size_is_read(toy, model, base_samples):
    subject, prompt = toy.ToySubjectSimilarity(model), toy.ToyPromptFidelity(model)
    image = pil(base_samples[0])
    with pytest.raises(ValueError, match="references"):
        subject.score([image], ["a photo of sks cube"])
    with pytest.raises(ValueError, match="prompts"):
        prompt.score([image, image], [base_samples[0].caption])
    with pytest.raises(ValueError, match="names no class"):
        prompt.score([image], ["a photo of a dog"])
    assert prompt.score([], []).shape == (0,)
    large = image.resize((128, 128), Image.Resampling.NEAREST).convert("RGBA")
    caption = base_samples[0].caption
    assert abs(prompt.score([large], [caption])[0] - prompt.score([image], [caption])[0]) < 0.1


def test_validation_on_a_fresh_small_sample_meets_the_threshold(tm, model):
    sizes = tm.ValidationSizes(base=200, per_held_out=5, per_subject=10, references=5)
    figures = tm.validate(model, seed=2024, sizes=sizes)
    assert figures["base"]["n"] == 200 and figures["identification"]["n"] == 2 * len(SUBJECTS) * 10
    assert figures["minimum"] >= tm.THRESHOLD, figures
    ident = figures["identification"]
    assert ident["toy_subject_same_subject"] > ident["toy_subject_plain_look_alike"] + 0.2


def test_training_is_deterministic_from_its_seed(tm):
    config = tm.TrainingConfig(steps=2, batch_size=8, base=16, per_subject=2, distractors=8)
    states = [
        tm.train(dataclasses.replace(config, seed=s), log=lambda _: None)[0].state_dict() for s in (3, 3, 4)
    ]
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0)
    assert any(not torch.equal(states[2][k], v) for k, v in states[0].items() if v.is_floating_point())


def test_training_pool_labels_match_its_scenes(tm, toy):
    pool = tm.render_pool(seed=6, base=8, per_subject=2, distractors=30, hard=4)
    names = toy.LABELS
    identity = [names["identity"][i] for i in pool.labels["identity"]]
    assert identity[:12] == ["plain"] * 12
    assert [names["class"][i] for i in pool.labels["class"][8:12]] == ["cube", "cylinder"] * 2
    assert identity[12:24] == [s.name for s in SUBJECTS for _ in range(2)]
    assert set(identity[24:]) == {"other"}
    assert [names["pattern"][i] for i in pool.labels["pattern"][:12]] == ["none"] * 12
    assert pool.images.shape == (54, 64, 64, 3) and pool.layout.shape == (54, 3)
    # Which colour is the body of a checkered object is unknowable: those colours are not learned.
    checks = pool.labels["pattern"][24:] == names["pattern"].index("checks")
    assert checks.any() and (pool.labels["colour"][24:][checks] == -1).all()
    # A checkered subject with its colours swapped is the same object, not another pattern.
    star = next(s for s in SUBJECTS if s.pattern.kind == "checks")
    swapped = dataclasses.replace(
        star.scene(np.random.default_rng(0), "snow", 1),
        colour=star.pattern.colour,
        pattern=dataclasses.replace(star.pattern, colour=star.colour),
    )
    assert tm.identity_of(swapped) == star.name


def test_degradations_are_seeded_and_keep_the_image_recognisable(tm, base_samples):
    images = np.stack([s.rendered.image for s in base_samples[:8]])
    first, again = tm.degrade(images, np.random.default_rng(1)), tm.degrade(images, np.random.default_rng(1))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.shape == (8, 3, 64, 64) and 0 <= first.min() and first.max() <= 1
    clean = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    error = (first - clean).abs().mean(dim=(1, 2, 3))
    assert error.max() < 0.15 and error.min() > 0
    rounded = tm.simulated_round_trip(images)
    assert rounded.dtype == np.uint8 and rounded.shape == images.shape
    assert np.abs(rounded.astype(float).mean(axis=(1, 2)) - images.mean(axis=(1, 2))).max() < 3
    assert not np.array_equal(rounded, images)


def test_vae_round_trip_uses_a_saved_autoencoder(tm, tmp_path, base_samples):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).save_pretrained(tmp_path)
    images = np.stack([s.rendered.image for s in base_samples[:3]])
    out = tm.vae_round_trip(tmp_path, batch_size=2)(images)
    assert out.dtype == np.uint8 and out.shape == images.shape


def test_train_command_needs_an_output_folder(tm):
    with pytest.raises(SystemExit):
        tm.main([])
