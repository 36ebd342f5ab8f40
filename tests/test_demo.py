"""The demo: trains to a perfect copy, captures with labels, and the CLI reports it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnscope
from attnscope.cli import main


def alignment_score(weights: torch.Tensor, expected: torch.Tensor) -> float:
    maps = attnscope.AttentionMaps.from_tensors({"x": weights}, kinds="cross")
    return float(attnscope.alignment(maps, "x", expected).score or 0.0)


def test_alignment_score_hand_computed() -> None:
    weights = torch.zeros(1, 2, 3, 3)
    weights[0, 0] = torch.eye(3)
    weights[0, 1, :, 0] = 1.0  # the second head always looks at key 0
    weights[0, 0, 2] = torch.tensor([0.0, 0.9, 0.1])
    # head mean rows: [1, 0, 0] -> 0; [.5, .5, 0] -> 0 (first max); [.5, .45, .05] -> 0
    assert alignment_score(weights, torch.arange(3)) == pytest.approx(1 / 3)


def test_demo_cli_default_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.split("accuracy (eval + no_grad, greedy): ")[1].split()[0])
    assert accuracy >= 0.99
    maps = attnscope.load(out / "attention.safetensors")
    assert len(maps.names) == 6
    assert sorted({maps.kind(n) for n in maps.names}) == ["causal", "cross", "self"]
    cross = maps.select(kind="cross").names[-1]
    assert maps.labels(cross)[1] == maps.tokens[0]  # keys of cross maps are source tokens
    assert maps.labels(cross)[0][0] == "<s>"
    for name in maps.select(kind="cross").names:
        assert f"{name}  " in printed
    assert (out / "report.html").is_file()
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "heads-causal.png",
        "heads-cross.png",
        "heads-self.png",
        "layers-causal.png",
        "layers-cross.png",
        "layers-self.png",
        "rollout.png",
    ]
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "rollout (self-attention, all layers)" in report
    assert "monotonic-alignment" in report  # the head statistics table
    assert (out / "head_stats.csv").read_text().startswith("module,head,entropy")
    section = printed.split("argmax is the source position being copied):")[1].split("\n\n")[0]
    scores = dict(line.split() for line in section.strip().splitlines())
    last_alignment = float(scores[cross])
    assert "head roles" in printed
    assert "monotonic-alignment" in printed.split("head roles")[1]
    assert last_alignment == pytest.approx(alignment_score(maps[cross], torch.arange(10)), abs=1e-3)


def test_demo_bad_steps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
