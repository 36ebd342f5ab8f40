"""Rollout, flow, head statistics and alignment against independent references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnscope
from attnscope import AttentionMaps, AttnScopeError

networkx = pytest.importorskip("networkx")
pytest.importorskip("scipy")


def random_maps(
    layers: int, tokens: int, heads: int = 2, batch: int = 1, seed: int = 0
) -> AttentionMaps:
    generator = torch.Generator().manual_seed(seed)
    return AttentionMaps.from_tensors(
        {
            f"layer.{i}": torch.softmax(
                torch.randn(batch, heads, tokens, tokens, generator=generator) * 2, -1
            )
            for i in range(layers)
        }
    )


def paper_rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's formula written out directly: Â = 0.5 A + 0.5 I, R = Â_L ... Â_1."""
    result = torch.eye(layers[0].size(-1), dtype=torch.float64)
    for weights in layers:  # (heads, n, n) of one batch item
        fused = weights.double().mean(0)
        augmented = 0.5 * fused + 0.5 * torch.eye(fused.size(-1), dtype=torch.float64)
        result = augmented @ result
    return result


def test_rollout_hand_computed_three_tokens_two_layers() -> None:
    first = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    second = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    maps = AttentionMaps.from_tensors({"a": first.view(1, 1, 3, 3), "b": second.view(1, 1, 3, 3)})
    # by hand: Â1 = [[1,0,0],[.25,.75,0],[0,.25,.75]], Â2 = [[1,0,0],[.5,.5,0],[0,0,1]]
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.625, 0.375, 0.0], [0.0, 0.25, 0.75]])
    torch.testing.assert_close(attnscope.rollout(maps)[0], expected)


def test_rollout_equals_the_paper_formula() -> None:
    maps = random_maps(4, 7, heads=3, batch=2)
    got = attnscope.rollout(maps)
    for item in range(2):
        reference = paper_rollout([maps[n][item] for n in maps.names])
        torch.testing.assert_close(got[item].double(), reference, atol=1e-6, rtol=0)


def test_rollout_options_and_padding() -> None:
    maps = random_maps(2, 5)
    maxed = attnscope.rollout(maps, head_fusion="max", residual=False)
    fused = [maps[n][0].amax(0) for n in maps.names]
    fused = [f / f.sum(-1, keepdim=True) for f in fused]
    torch.testing.assert_close(maxed[0], fused[1] @ fused[0])
    discarded = attnscope.rollout(maps, discard_ratio=0.4, residual=False)
    assert torch.all(discarded[0].sum(-1) > 0.99)
    # padded batch: token 3, 4 of item 1 are padding (zero rows, no query attends to them)
    weights = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    weights[1, :, :, 3:] = 0
    weights[1] /= weights[1].sum(-1, keepdim=True)
    weights[1, :, 3:] = 0
    padded = attnscope.rollout(AttentionMaps.from_tensors({"a": weights, "b": weights}))
    assert torch.all(padded[1, :3, 3:] == 0)
    assert torch.all(padded[1, 3:] == 0)
    torch.testing.assert_close(padded[1, :3].sum(-1), torch.ones(3))


def test_rollout_first_token_never_discarded() -> None:
    weights = torch.zeros(1, 1, 4, 4)
    weights[0, 0, :, 0] = 0.01
    weights[0, 0, :, 1:] = 0.33
    result = attnscope.rollout(
        AttentionMaps.from_tensors({"a": weights}), discard_ratio=0.5, residual=False
    )
    assert torch.all(result[0, :, 0] > 0)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    tokens=st.integers(1, 6),
    seed=st.integers(0, 1000),
    fusion=st.sampled_from(["mean", "max", "min"]),
)
def test_rollout_rows_sum_to_one(layers: int, tokens: int, seed: int, fusion: str) -> None:
    result = attnscope.rollout(random_maps(layers, tokens, seed=seed), head_fusion=fusion)
    torch.testing.assert_close(result.sum(-1), torch.ones(1, tokens))


def networkx_flow(maps: AttentionMaps) -> torch.Tensor:
    """The paper's layered graph in networkx, one max-flow per pair."""
    matrices = []
    for name in maps.names:
        fused = maps[name][0].double().mean(0)
        augmented = fused + torch.eye(fused.size(-1), dtype=torch.float64)
        matrices.append(augmented / augmented.sum(-1, keepdim=True))
    n = matrices[0].size(-1)
    graph = networkx.DiGraph()
    for layer, matrix in enumerate(matrices, start=1):
        for query in range(n):
            for key in range(n):
                graph.add_edge((layer - 1, key), (layer, query), capacity=float(matrix[query, key]))
    result = torch.zeros(n, n, dtype=torch.float64)
    for query in range(n):
        for key in range(n):
            result[query, key] = networkx.maximum_flow_value(
                graph, (0, key), (len(matrices), query)
            )
    return result


@pytest.mark.parametrize(("layers", "tokens", "seed"), [(1, 3, 0), (2, 4, 1), (3, 5, 2), (4, 4, 3)])
def test_flow_equals_networkx_max_flow(layers: int, tokens: int, seed: int) -> None:
    maps = random_maps(layers, tokens, seed=seed)
    got = attnscope.flow(maps)[0].double()
    torch.testing.assert_close(got, networkx_flow(maps), atol=1e-6, rtol=0)


@settings(max_examples=10, deadline=None)
@given(layers=st.integers(1, 3), tokens=st.integers(2, 5), seed=st.integers(0, 1000))
def test_flow_never_exceeds_capacities(layers: int, tokens: int, seed: int) -> None:
    maps = random_maps(layers, tokens, seed=seed)
    result = attnscope.flow(maps)[0]
    assert torch.all(result <= 1 + 1e-6)  # the sink's incoming capacity is a row: it sums to 1
    assert torch.all(result >= 0)
    # a single layer: the only path is the direct edge
    if layers == 1:
        fused = maps["layer.0"][0].mean(0) + torch.eye(tokens)
        torch.testing.assert_close(result, fused / fused.sum(-1, keepdim=True), atol=1e-6, rtol=0)


def test_flow_refuses_huge_requests_with_an_estimate() -> None:
    maps = AttentionMaps.from_tensors({"a": torch.full((1, 1, 400, 400), 1 / 400)})
    with pytest.raises(AttnScopeError, match=r"would take about [\d,]+ s.*rollout"):
        attnscope.flow(maps, max_seconds=1)


def test_head_stats_hand_computed() -> None:
    n = 5
    previous = torch.zeros(n, n)
    previous[0, 0] = 1
    previous[torch.arange(1, n), torch.arange(0, n - 1)] = 1
    uniform = torch.full((n, n), 1 / n)
    first = torch.zeros(n, n)
    first[:, 0] = 1
    diagonal = torch.eye(n)
    weights = torch.stack([previous, uniform, first, diagonal]).unsqueeze(0)
    table = attnscope.head_stats(AttentionMaps.from_tensors({"l": weights}))
    rows = list(table)
    assert [r["role"] for r in rows] == ["previous-token", "broad", "first-token", "self"]
    assert rows[0]["previous"] == pytest.approx(4 / 5)  # row 0 has no previous token
    assert rows[0]["distance"] == pytest.approx(4 / 5)  # rows 1..4 at distance 1, row 0 at 0
    assert rows[1]["entropy"] == pytest.approx(math.log(5))
    assert rows[1]["distance"] == pytest.approx(
        sum(abs(i - j) for i in range(5) for j in range(5)) / 25
    )
    assert rows[2]["first"] == pytest.approx(1.0)
    assert rows[3]["self"] == pytest.approx(1.0)
    assert set(rows[0]) == {
        "module",
        "head",
        "entropy",
        "distance",
        "first",
        "previous",
        "self",
        "role",
    }
    csv_text = table.to_csv()
    assert csv_text.splitlines()[0] == "module,head,entropy,distance,first,previous,self,role"
    assert "previous-token" in str(table)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_uniform_is_broad_and_a_window_is_local_at_any_length(n: int) -> None:
    uniform = torch.full((1, 1, n, n), 1 / n)
    window = torch.zeros(1, 1, 12, 12)
    for i in range(12):
        keys = [j for j in (i - 1, i, i + 1) if 0 <= j < 12]
        window[0, 0, i, keys] = 1 / len(keys)
    table = list(attnscope.head_stats(AttentionMaps.from_tensors({"u": uniform, "w": window})))
    assert [row["role"] for row in table] == ["broad", "local"]


def test_head_stats_ignores_padding_and_finds_alignment() -> None:
    cross = torch.zeros(1, 1, 4, 6)
    cross[0, 0, torch.arange(4), torch.tensor([0, 1, 3, 5])] = 1.0
    weights = torch.full((2, 1, 4, 4), 0.25)
    weights[1, :, 2:] = 0  # two padded queries in item 1
    table = attnscope.head_stats(
        AttentionMaps.from_tensors({"x": cross, "s": weights}, kinds={"x": "cross", "s": "self"})
    )
    rows = list(table)
    assert rows[0]["role"] == "monotonic-alignment"
    assert rows[1]["entropy"] == pytest.approx(math.log(4))


def test_alignment_against_expected() -> None:
    weights = torch.zeros(1, 2, 3, 4)
    weights[0, :, 0, 0] = 1
    weights[0, :, 1, 2] = 1
    weights[0, :, 2, 3] = 1
    result = attnscope.alignment(
        AttentionMaps.from_tensors({"x": weights}, kinds="cross"), "x", torch.tensor([0, 1, 3])
    )
    assert result.hard.tolist() == [[0, 2, 3]]
    assert result.score == pytest.approx(2 / 3)
    hard, score = result
    assert score == result.score
    assert hard is result.hard


def test_bad_input() -> None:
    maps = random_maps(2, 3)
    with pytest.raises(AttnScopeError, match="head_fusion"):
        attnscope.rollout(maps, head_fusion="median")
    with pytest.raises(AttnScopeError, match="discard_ratio"):
        attnscope.rollout(maps, discard_ratio=1.0)
    with pytest.raises(AttnScopeError, match="one stack"):
        attnscope.rollout(maps, kind="cross")
