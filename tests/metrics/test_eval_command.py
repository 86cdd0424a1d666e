"""``dreamblend eval`` end to end on a ``dreamblend batch`` run of the tiny pipeline, with real photos.

The run: 2 prompts x 2 seeds x alpha {0, 0.5} = 8 images, 2 per (prompt, operating point), scored
against the DreamBooth benchmark's dog photos with tiny CLIP/DINO/CLIPSeg models.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from metric_helpers import DREAMBOOTH
from PIL import Image

from dreamblend.cli import main
from dreamblend.commands import eval as eval_command
from dreamblend.metrics import available_metrics, build_metrics
from dreamblend.testing import save_tiny_pipeline, tiny_sd_components, tiny_sd_pipeline

pytestmark = pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason=f"benchmark data not at {DREAMBOOTH}")
DOG = DREAMBOOTH / "dog"
JUNGLE, BEACH = "a sks dog in the jungle", "a sks dog on the beach"
METRICS = ["dino", "clip_i", "clip_t", "diversity"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd")
    save_tiny_pipeline(tiny_sd_pipeline(0), root / "base")
    tiny_sd_components(1)["unet"].save_pretrained(root / "g" / "unet")
    return root


def _batch(models: Path, folder: Path, prompts: list, **overrides: object) -> Path:
    jobs = {"model": str(models / "base"), "output_dir": "out", "prompts": prompts, "seeds": [0, 1],
            "pairs": [{"guidance": str(models / "g")}], "alpha": [0.0, 0.5], "cfg": 3.0, "steps": 2,
            "height": 16, "width": 16, **overrides}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jobs.yaml").write_text(yaml.safe_dump(jobs))
    assert main(["batch", str(folder / "jobs.yaml"), "--no-progress"]) == 0
    return folder / "out"


@pytest.fixture(scope="module")
def run(models, tmp_path_factory) -> Path:
    return _batch(models, tmp_path_factory.mktemp("batch"), [JUNGLE, BEACH])


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture
def evaluate(metric_models):
    def call(manifest: Path, *args: str) -> int:
        models = ["--model-clip", metric_models["clip"], "--model-dino", metric_models["dino"],
                  "--model-clipseg", metric_models["clipseg"]]  # fmt: skip
        return main(["eval", str(manifest), *models, "--device", "cpu", "--no-progress", *args])

    return call


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_scores_every_image_and_summarizes_per_operating_point(
    run, evaluate, metric_models, tmp_path, capsys
):
    out = tmp_path / "eval"
    assert evaluate(run, "--references", str(DOG), "--out", str(out), "--batch-size", "3") == 0
    assert capsys.readouterr().out.startswith("8 images scored, 0 already scored; tables in")
    rows = _rows(out)
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["file"]) for r in rows] != [] and len({(r["id"], r["file"]) for r in rows}) == 8
    assert {r["id"] for r in rows} == {m["id"] for m in manifest}
    assert all(r["subject"] == "dog" and r["error"] is None for r in rows)
    assert all(math.isfinite(r[m]) for r in rows for m in METRICS)

    # one image's scores, recomputed by the metrics directly
    row = rows[0]
    photos = [Image.open(p).convert("RGB") for p in sorted(DOG.glob("*.jpg"))]
    image = Image.open(run / row["file"]).convert("RGB")
    for metric in build_metrics(["dino", "clip_i", "clip_t"], device="cpu", models=metric_models):
        assert metric.score([image], [row["prompt"]], photos)[0] == pytest.approx(row[metric.name], abs=1e-6)
    # diversity is symmetric within a pair of images of one prompt and operating point
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["prompt"], r["alpha"]), []).append(r["diversity"])
    assert all(len(v) == 2 and v[0] == pytest.approx(v[1], abs=1e-9) for v in pairs.values())

    table = _csv(out / "scores.csv")
    assert [r["file"] for r in table] == [m["file"] for m in manifest]
    assert list(table[0]) == [*eval_command.ROW_FIELDS, *METRICS, "error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == {
        "dino": "subject",
        "clip_i": "subject",
        "clip_t": "prompt",
        "diversity": "diversity",
    }
    groups = summary["groups"]
    assert sorted(g["alpha"] for g in groups) == [0.0, 0.5] and all(g["images"] == 4 for g in groups)
    for group in groups:
        values = np.array([r["dino"] for r in rows if r["alpha"] == group["alpha"]])
        assert group["dino_mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert group["dino_se"] == pytest.approx(values.std(ddof=1) / 2, abs=1e-12) and group["dino_n"] == 4
    assert len(_csv(out / "summary.csv")) == 2 and (out / "errors.jsonl").read_text() == ""

    before = (out / "scores.jsonl").read_bytes()
    assert evaluate(run, "--references", str(DOG), "--out", str(out)) == 0  # nothing left to do
    assert capsys.readouterr().out.startswith("0 images scored, 8 already scored")
    assert (out / "scores.jsonl").read_bytes() == before


def test_a_killed_run_resumes_and_scores_each_image_once(run, evaluate, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    real_append = eval_command.ScoreLog.append
    written = []

    def dying_append(self, row):  # the process "dies" after 3 rows
        if len(written) == 3:
            raise KeyboardInterrupt
        real_append(self, row)
        written.append(row["file"])

    monkeypatch.setattr(eval_command.ScoreLog, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, "--references", str(DOG), "--out", str(out), "--batch-size", "3")
    first = _rows(out)
    assert len(first) == 3 and len(_csv(out / "scores.csv")) == 3  # tables rebuilt on the way out
    monkeypatch.setattr(eval_command.ScoreLog, "append", real_append)
    assert evaluate(run, "--references", str(DOG), "--out", str(out), "--batch-size", "3") == 0
    rows = _rows(out)
    assert len(rows) == 8 == len({(r["id"], r["file"]) for r in rows})  # each image scored exactly once
    assert rows[:3] == first
    pairs: dict = {}
    for r in rows:  # an image's diversity partner scored in the first run is compared in the second
        pairs.setdefault((r["prompt"], r["alpha"]), []).append(r["diversity"])
    assert all(v[0] == pytest.approx(v[1], abs=1e-9) for v in pairs.values())

    data = (out / "scores.jsonl").read_bytes()  # a kill in the middle of writing a row
    (out / "scores.jsonl").write_bytes(data[:-20])
    assert evaluate(run, "--references", str(DOG), "--out", str(out)) == 0
    rows = _rows(out)
    assert len(rows) == 8 == len({(r["id"], r["file"]) for r in rows})


def test_missing_and_broken_images_are_reported_per_row_then_retried(run, run_copy, evaluate, capsys):
    manifest = [json.loads(line) for line in (run_copy / "manifest.jsonl").read_text().splitlines()]
    (run_copy / manifest[0]["file"]).unlink()
    (run_copy / manifest[5]["file"]).write_bytes(b"not a png")
    out = run_copy / "eval"
    assert evaluate(run_copy, "--references", str(DOG)) == 1
    assert f"6 images scored, 0 already scored; 2 could not be scored (see {out / 'errors.jsonl'})" in (
        capsys.readouterr().out
    )
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file"] for e in errors] == [manifest[0]["file"], manifest[5]["file"]]
    assert "does not exist" in errors[0]["error"] and "not a readable image" in errors[1]["error"]
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert [g["images"] for g in groups] == [3, 3]
    lone = next(r for r in _rows(out) if r["file"] == manifest[1]["file"])  # its prompt partner is missing
    assert lone["diversity"] is None and lone["dino"] is not None
    assert next(g for g in groups if g["alpha"] == 0.0)["diversity_n"] == 2

    for i in (0, 5):
        shutil.copy(run / manifest[i]["file"], run_copy / manifest[i]["file"])
    assert evaluate(run_copy, "--references", str(DOG)) == 0
    assert capsys.readouterr().out.startswith("2 images scored, 6 already scored;")
    assert (out / "errors.jsonl").read_text() == "" and len(_csv(out / "scores.csv")) == 8


def _link_subjects(root: Path, **subjects: Path | None) -> Path:
    for name, target in subjects.items():
        if target is None:
            (root / name).mkdir(parents=True)
        else:
            root.mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to(target, target_is_directory=True)
    return root


def test_a_benchmark_root_takes_the_subject_from_the_row_or_the_class_word(run_copy, evaluate, tmp_path):
    manifest = run_copy / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    subjects = {(JUNGLE, 0.0): "dog2", (JUNGLE, 0.5): "empty", (BEACH, 0.0): "dog4"}  # beach 0.5: none
    for row in rows:
        if (row["prompt"], row["alpha"]) in subjects:
            row["subject"] = subjects[row["prompt"], row["alpha"]]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = _link_subjects(tmp_path / "root", dog=DOG, dog2=DOG, cat=DREAMBOOTH / "cat", empty=None)
    assert evaluate(run_copy, "--references", str(root), "--out", str(tmp_path / "a")) == 1
    scored = {(r["prompt"], r["alpha"]): r for r in _rows(tmp_path / "a")}
    assert scored[JUNGLE, 0.0]["subject"] == "dog2" and scored[JUNGLE, 0.0]["error"] is None
    assert "holds no images" in scored[JUNGLE, 0.5]["error"]
    assert "no folder for subject 'dog4'" in scored[BEACH, 0.0]["error"]
    assert "subjects ['dog', 'dog2'] all have class 'dog'; pass --subject" in scored[BEACH, 0.5]["error"]

    only_dog = _link_subjects(tmp_path / "root2", dog=DOG, cat=DREAMBOOTH / "cat")
    plain = [{k: v for k, v in r.items() if k != "subject"} for r in rows]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in plain))
    assert evaluate(run_copy, "--references", str(only_dog), "--out", str(tmp_path / "b")) == 0
    assert {r["subject"] for r in _rows(tmp_path / "b")} == {"dog"}  # the class word after the token
    assert (
        evaluate(run_copy, "--references", str(root), "--subject", "dog2", "--out", str(tmp_path / "c")) == 0
    )
    assert {r["subject"] for r in _rows(tmp_path / "c")} == {"dog2"}


def test_batch_records_a_prompts_subject(models, tmp_path):
    out = _batch(models, tmp_path, [{"prompt": JUNGLE, "subject": "dog2"}, JUNGLE], seeds=[0], alpha=0.0)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["subject"] for r in records] == ["dog2", None]
    assert records[0]["id"] != records[1]["id"]  # same prompt and seed, different subjects: two images
    jobs = yaml.safe_load((tmp_path / "jobs.yaml").read_text())
    (tmp_path / "jobs.yaml").write_text(
        yaml.safe_dump({**jobs, "prompts": [{"prompt": JUNGLE, "class": "dog"}]})
    )
    assert main(["batch", str(tmp_path / "jobs.yaml")]) == 2


def test_masks_given_as_files_replace_segmentation(run, evaluate, tmp_path):
    masks, reference_masks = tmp_path / "masks", tmp_path / "reference_masks"
    masks.mkdir(), reference_masks.mkdir()
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    for row in manifest[1:]:  # the first image has no mask
        Image.new("L", Image.open(run / row["file"]).size, 255).save(
            masks / Path(row["file"]).with_suffix(".png").name
        )
    for photo in sorted(DOG.glob("*.jpg")):
        Image.new("L", Image.open(photo).size, 255).save(reference_masks / f"{photo.stem}.png")
    args = ["--references", str(DOG), "--metrics", "mdino", "dino", "--masks", str(masks),
            "--reference-masks", str(reference_masks), "--model-clipseg", str(tmp_path / "no-clipseg"),
            "--out", str(tmp_path / "e")]  # fmt: skip
    assert evaluate(run, *args) == 1  # CLIPSeg is never loaded: every mask is given
    rows = _rows(tmp_path / "e")
    assert "no mask" in rows[0]["error"]
    assert all(r["mdino"] == pytest.approx(r["dino"], abs=1e-9) for r in rows[1:])  # all-white masks keep all


def test_command_errors_name_the_fix(run, run_copy, evaluate, tmp_path, capsys, monkeypatch):
    def fails(*args: str, message: str) -> None:
        assert evaluate(*args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    out = ["--out", str(tmp_path / "e")]
    fails(run, "--references", str(tmp_path / "nope"), *out, message="--references")
    fails(tmp_path / "nothing.jsonl", "--references", str(DOG), *out, message="does not exist")
    fails(
        run, "--references", str(DOG), "--metrics", "dino", "fid", *out, message="unknown metric(s) ['fid']"
    )
    fails(run, "--references", str(DOG), "--batch-size", "0", *out, message="--batch-size must be at least 1")
    (run_copy / "manifest.jsonl").write_text('{"file": "a.png", "prompt": "a sks dog"}\n{oops\n')
    fails(run_copy, "--references", str(DOG), *out, message="line 2 is not JSON")
    (run_copy / "manifest.jsonl").write_text('{"file": "a.png"}\n')
    fails(run_copy, "--references", str(DOG), *out, message="line 1 needs string fields 'file' and 'prompt'")

    assert evaluate(run, "--references", str(DOG), "--metrics", "clip_t", *out) == 0
    scores = tmp_path / "e" / "scores.jsonl"
    scores.write_text("garbage\n" + scores.read_text())
    fails(run, "--references", str(DOG), "--metrics", "clip_t", *out, message="line 1 is not a score row")
    fails(run, "--references", str(DOG), "--metrics", "clip_t", "--token", "zwx", *out,
          message="holds scores made with other options (token: 'sks' then, 'zwx' now)")  # fmt: skip

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fails(run, "--references", str(DOG), "--model-dino", "no-org/no-dino", "--out", str(tmp_path / "f"),
          message="cannot load 'no-org/no-dino' from the Hugging Face Hub: offline mode")  # fmt: skip


def test_metrics_registered_by_another_module_plug_in(run, evaluate, tmp_path, monkeypatch, scratch_registry):
    (tmp_path / "toy_metrics.py").write_text(
        "import numpy as np\n"
        "from dreamblend.metrics import Metric, register_metric\n\n\n"
        "class Brightness(Metric):\n"
        "    name = 'toy_brightness'\n"
        "    role = 'subject'\n\n"
        "    def compute(self, images, prompts, references):\n"
        "        return np.array([np.asarray(im.convert('L')).mean() / 255 for im in images])\n\n\n"
        "register_metric('toy_brightness', lambda context: Brightness())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--references", str(DOG), "--metrics-from", "toy_metrics", "--metrics", "toy_brightness"]
    assert evaluate(run, *args, "--out", str(tmp_path / "e")) == 0
    rows = _rows(tmp_path / "e")
    expected = np.asarray(Image.open(run / rows[0]["file"]).convert("L")).mean() / 255
    assert rows[0]["toy_brightness"] == pytest.approx(expected)
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["metrics"] == {
        "toy_brightness": "subject"
    }


def test_help_lists_every_built_in_metric(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    # The built-ins; metrics other modules register on import (the toy world's) are not in the help.
    built_in = ("dino", "clip_i", "clip_t", "diversity", "mdino", "mclip_i")
    assert set(built_in) <= set(available_metrics())
    assert all(name in text for name in built_in)
