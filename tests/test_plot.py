"""matplotlib figures: returned, never shown, labelled, padding marked; PNGs non-blank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.plot import padded_positions, save_figures

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402


def padded_maps() -> AttentionMaps:
    weights = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    weights[1, :, 4:] = 0  # padded queries
    weights[1, :, :4, 4:] = 0  # padded keys
    weights[1, :, :4, :4] /= weights[1, :, :4, :4].sum(-1, keepdim=True)
    cross = torch.softmax(torch.randn(2, 4, 3, 6), -1)
    return AttentionMaps.from_tensors(
        {"enc": weights, "x": cross}, kinds={"enc": "self", "x": "cross"}
    ).with_tokens(["a", "b", "c", "d", "e", "f"], ["<s>", "y", "z"])


def test_padding_found_from_the_weights() -> None:
    rows, cols = padded_positions(padded_maps()["enc"][1], "self")
    assert rows.tolist() == [False] * 4 + [True] * 2
    assert cols.tolist() == [False] * 4 + [True] * 2


def test_figures_are_returned_with_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("show() called"))
    maps = padded_maps()
    heads = attnscope.plot_heads(maps, "x", batch=1)
    assert isinstance(heads, Figure)
    axes = heads.axes
    assert len([a for a in axes if a.get_visible() and a.images]) == 4
    labelled = [a for a in axes if a.get_yticklabels()]
    assert [t.get_text() for t in labelled[0].get_yticklabels()] == ["<s>", "y", "z"]
    layers = attnscope.plot_layers(maps, kind="self")
    assert len([a for a in layers.axes if a.images]) == 4
    one = attnscope.plot_head(maps, "enc", 2, batch=1)
    assert [t.get_text() for t in one.axes[0].get_xticklabels()] == ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(AttnScopeError, match="head=9"):
        attnscope.plot_head(maps, "enc", 9)


def test_long_sequences_thin_labels() -> None:
    n = 300
    maps = AttentionMaps.from_tensors(
        {"l": torch.softmax(torch.randn(1, 1, n, n), -1)}
    ).with_tokens([f"t{i}" for i in range(n)])
    fig = attnscope.plot_head(maps, "l")
    assert 0 < len(fig.axes[0].get_xticklabels()) <= 40


def test_png_figures_non_blank_and_sized(tmp_path: Path) -> None:
    written = save_figures(padded_maps(), str(tmp_path))
    assert sorted(Path(p).name for p in written) == [
        "heads-cross.png",
        "heads-self.png",
        "layers-cross.png",
        "layers-self.png",
    ]
    for path in written:
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert (image[..., :3] < 0.9).mean() > 0.02  # real ink, not a blank canvas
    fig = attnscope.plot_head(padded_maps(), "enc")
    fig.savefig(tmp_path / "one.png", dpi=100)
    assert imread(tmp_path / "one.png").shape[:2] == (600, 700)
