"""``dreamblend train jedi`` then ``dreamblend generate-jedi``: the command-line round trip, tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.state import AcceleratorState
from jedi_helpers import random_images
from PIL import Image

from dreamblend.cli import main


def test_train_then_generate(sd_dir: Path, stacked_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "jedi", "--model", str(sd_dir), "--data", str(stacked_dir), "--output", str(out)]
    assert (
        main([*argv, "--max-steps", "2", "--mode", "lora", "--no-progress", "--mixed-precision", "no"]) == 0
    )
    assert json.loads((out / "checkpoint-2" / "checkpoint.json").read_text())["set_size"] == 3
    AcceleratorState._reset_state(reset_partial_state=True)
    # a second run into the same folder without --resume is refused with the fix
    assert main([*argv, "--max-steps", "2", "--no-progress", "--mixed-precision", "no"]) == 2
    assert "pass --resume" in capsys.readouterr().err

    refs = []
    for i, image in enumerate(random_images(2, 5)):
        refs.append(tmp_path / f"ref{i}.png")
        image.save(refs[-1])
    gen = [
        "generate-jedi",
        "a dog in the snow",
        "--model",
        str(sd_dir),
        "--checkpoint",
        str(out / "checkpoint-2"),
    ]
    gen += ["--reference", str(refs[0]), "--reference", str(refs[1]), "--steps", "2"]
    target = tmp_path / "img" / "jedi.png"
    code = main(
        [
            *gen,
            "--reference-prompt",
            "a dog",
            "--reference-prompt",
            "a dog on the grass",
            "--num-images",
            "2",
            "--save-sets",
            "--guidance",
            "text_first",
            "--partial-cfg",
            "2",
            "--out",
            str(target),
        ]
    )
    assert code == 0
    written = sorted(p.name for p in target.parent.iterdir())
    assert written == ["jedi_0.png", "jedi_0_set.png", "jedi_1.png", "jedi_1_set.png"]
    assert Image.open(target.parent / "jedi_0_set.png").size == (32, 96)
    capsys.readouterr()
    assert main([*gen, "--reference-prompt", "a dog", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs a caption" in capsys.readouterr().err
    assert main([*gen[:-4], "--reference", str(tmp_path / "nope.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
