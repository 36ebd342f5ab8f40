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


def diffuse_maps() -> AttentionMaps:
    """Head 0 diffuse (0.25 on the diagonal, 0.15 elsewhere), head 1 sharp (one-hot)."""
    diffuse = (torch.full((6, 6), 1 / 6) + 0.1 * (torch.eye(6) - 1 / 6))[None, None]
    sharp = torch.eye(6)[None, None]
    cross = torch.softmax(torch.randn(1, 2, 3, 6), -1)
    return AttentionMaps.from_tensors(
        {"enc": torch.cat([diffuse, sharp], dim=1), "x": cross},
        kinds={"enc": "self", "x": "cross"},
    ).with_tokens(["a", "b", "c", "d", "e", "f"], ["<s>", "y", "z"])


def _map_axes(fig: Figure) -> list:
    return [a for a in fig.axes if a.images and a.get_label() != "<colorbar>"]


def _colorbars(fig: Figure) -> list:
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def test_the_default_scale_is_per_head_so_a_diffuse_head_keeps_its_contrast() -> None:
    maps = diffuse_maps()
    weights = maps["enc"][0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))
    fig = attnscope.plot_heads(maps, "enc")
    limits = [ax.images[0].get_clim() for ax in _map_axes(fig)]
    assert limits == pytest.approx([(0.0, float(weights[0].max())), (0.0, 1.0)])
    assert len(_colorbars(fig)) == 2  # one per head: each has its own range
    fixed = attnscope.plot_heads(maps, "enc", scale="fixed")
    assert [ax.images[0].get_clim() for ax in _map_axes(fixed)] == [(0.0, 1.0)] * 2
    assert len(_colorbars(fixed)) == 1
    shared = attnscope.plot_layers(maps, kind="self", scale="shared")
    assert [ax.images[0].get_clim() for ax in _map_axes(shared)] == [(0.0, 1.0)] * 2
    number = attnscope.plot_head(maps, "enc", 0, scale=0.25)
    assert number.axes[0].images[0].get_clim() == (0.0, 0.25)
    one = attnscope.plot_head(maps, "enc", 0)
    assert one.axes[0].images[0].get_clim() == pytest.approx((0.0, float(weights[0].max())))
    for bad in ("log", -1.0, 0):
        with pytest.raises(AttnScopeError, match="scale"):
            attnscope.plot_head(maps, "enc", scale=bad)


def test_cmap_and_transpose() -> None:
    maps = diffuse_maps()
    fig = attnscope.plot_head(maps, "x", 1, cmap="viridis", transpose=True)
    ax = fig.axes[0]
    image = ax.images[0]
    assert image.get_cmap().name == "viridis"
    assert image.get_array().shape == (6, 3)  # keys on y, queries on x
    torch.testing.assert_close(torch.tensor(image.get_array()), maps["x"][0, 1].t())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<s>", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c", "d", "e", "f"]
    assert ax.get_xlabel() == "query (decoder)" and ax.get_ylabel() == "key (encoder)"
    upright = attnscope.plot_head(maps, "x", 1)
    assert upright.axes[0].images[0].get_array().shape == (3, 6)
    assert upright.axes[0].get_xlabel() == "key (encoder)"
    grid = attnscope.plot_heads(padded_maps(), "enc", batch=1, transpose=True)
    shades = [a.images[1].get_array() for a in _map_axes(grid)]  # padding greyed, transposed
    assert all(s[:, 4:, 3].min() > 0 and s[4:, :, 3].min() > 0 for s in shades)
    layers = attnscope.plot_layers(maps, transpose=True, cmap="magma")
    assert all(a.images[0].get_cmap().name == "magma" for a in _map_axes(layers))
    assert "x: query" in layers._suptitle.get_text()


def test_head_labels() -> None:
    maps = diffuse_maps()
    titles = [a.get_title() for a in _map_axes(attnscope.plot_heads(maps, "enc", head_labels=1))]
    assert titles == ["head 1", "head 2"]
    named = attnscope.plot_heads(maps, "enc", head_labels=["local", "diagonal"])
    assert [a.get_title() for a in _map_axes(named)] == ["local", "diagonal"]
    called = attnscope.plot_layers(maps, kind="self", head_labels=lambda h: f"H{h + 1}")
    assert [a.get_title() for a in _map_axes(called)] == ["H1", "H2"]
    assert attnscope.plot_head(maps, "enc", 1, head_labels=1).axes[0].get_title().endswith("head 2")
    with pytest.raises(AttnScopeError, match="one label per head"):
        attnscope.plot_heads(maps, "enc", head_labels=["only one"])


def test_colour_bars_and_token_ticks_on_both_axes_of_every_figure() -> None:
    maps = diffuse_maps()
    layers = attnscope.plot_layers(maps)
    cells = _map_axes(layers)
    assert len(cells) == 4 and len(_colorbars(layers)) == 4
    # rows: enc (self, keys a-f), x (cross, keys a-f): key ticks at the bottom, queries left
    enc_row, cross_row = cells[:2], cells[2:]
    assert [t.get_text() for t in enc_row[0].get_yticklabels()] == list("abcdef")
    assert [t.get_text() for t in cross_row[0].get_yticklabels()] == ["<s>", "y", "z"]
    assert [t.get_text() for t in cross_row[1].get_xticklabels()] == list("abcdef")
    assert not enc_row[0].get_xticklabels() and not enc_row[1].get_yticklabels()
    heads = attnscope.plot_heads(maps, "x")
    assert all(a.get_xticklabels() for a in _map_axes(heads))  # one line of heads: all bottom
    assert [t.get_text() for t in _map_axes(heads)[0].get_yticklabels()] == ["<s>", "y", "z"]
    one = attnscope.plot_head(maps, "enc", 0)
    assert len(_colorbars(one)) == 1
    assert one.axes[0].get_xticklabels() and one.axes[0].get_yticklabels()


def test_modules_called_several_times_are_titled_by_what_is_shown() -> None:
    steps = [torch.softmax(torch.randn(1, 2, 3, 3), -1), torch.softmax(torch.randn(1, 2, 1, 4), -1)]
    incremental = AttentionMaps.from_tensors({"dec": steps}, kinds="causal")
    fig = attnscope.plot_heads(incremental, "dec")
    assert "2 incremental calls joined" in fig._suptitle.get_text()
    assert _map_axes(fig)[0].images[0].get_array().shape == (4, 4)
    rerun = AttentionMaps.from_tensors({"dec": [steps[0], torch.rand(1, 2, 4, 4)]}, kinds="causal")
    with pytest.warns(UserWarning, match=r"attn\.calls\('dec'\)\[-1\]"):
        fig = attnscope.plot_heads(rerun, "dec")
    assert "last of 2 calls" in fig._suptitle.get_text()
