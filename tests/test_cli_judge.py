"""`safeedit judge`: an operator tries a judge model on one image before putting it behind the proxy."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from guard.cli import main

POLICY = """\
id: cli-test
version: 4
categories:
  sexual: {threshold: 0.5, action: edit}
  violence: {threshold: 0.0, action: edit}
  minors: {threshold: 1.0, action: refuse}
"""


@pytest.fixture
def files(tmp_path: Path, tiny_vlm_dir: Path) -> dict[str, Path]:
    image = tmp_path / "out.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    image.write_bytes(buf.getvalue())
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    config = tmp_path / "config.yaml"
    config.write_text(f"judge:\n  kind: vlm\n  model: {tiny_vlm_dir}\n  max_new_tokens: 5\n")
    return {"image": image, "policy": policy, "config": config}


def test_judge_prints_the_verdict_with_timings(files: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["judge", "--config", str(files["config"]), "--policy", str(files["policy"]),
                 "--image", str(files["image"]), "--prompt", "a knight fighting a dragon",
                 "--repeat", "2"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["judge"] == "vlm:safeeditor:model"
    assert out["policy"]["id"] == "cli-test" and out["policy"]["version"] == 4
    assert set(out["scores"]) == {"sexual", "violence", "minors"}
    assert all(0.0 <= s <= 1.0 for s in out["scores"].values())
    # violence's threshold is 0: always crossed, so the judge explains and edits.
    assert out["action"] == "edit" and "violence" in out["flagged"]
    assert out["raw"].startswith("<judgement>\n") and out["details"]["decoded_tokens"] > 0
    timings = out["timings_ms"]
    assert timings["load"] > 0 and timings["judge"] > 0
    assert len(timings["runs"]) == 2 and timings["judge_warm_median"] > 0


def test_model_flags_need_no_config(files: dict[str, Path], tiny_vlm_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["judge", "--model", str(tiny_vlm_dir), "--profile", "shieldgemma2",
                 "--set", "max_batch=2", "--policy", str(files["policy"]),
                 "--prompt", "a quiet lake"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["judge"] == "vlm:shieldgemma2:model"
    assert out["details"]["decoded_tokens"] == 0  # judge-only profile: never decodes


def test_bad_inputs_are_one_clear_line(files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["judge", "--config", str(files["config"]), "--policy", str(files["policy"]),
                 "--image", str(broken), "--prompt", "x"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["judge", "--kind", "vlm", "--set", "nonsense", "--prompt", "x"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
