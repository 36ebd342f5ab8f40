"""attnscope.scan: equal to running each text alone, whatever the batch size or padding."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import attnscope
from attnscope.head_stats import row_statistics
from attnscope.scan.aggregate import Accumulator, HeadSums
from attnscope.scan.tables import counts_of
from test_scan_support import (
    STATS,
    TEXTS,
    alone,
    assert_rows_close,
    expected_rows,
    minilm,
    row_values,
    tiny,
    tokenizer,
)

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tokenizer()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_scan_equals_each_text_alone(kind: str, tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny(kind)  # float64: the comparison is about the statistics, not the kernels
    want = expected_rows(alone(model, tok, TEXTS))
    for batch_size in (1, 3, 16):
        got = attnscope.scan(model, tok, TEXTS, batch_size=batch_size).to_pylist()
        assert_rows_close(got, want, rtol=1e-9)
    kinds = {r["kind"] for r in want}
    assert kinds == {"bert": {"self"}, "gpt2": {"causal"}, "t5": {"self", "causal", "cross"}}[kind]


def test_padding_side_of_the_tokenizer_changes_nothing(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny("bert")
    right = attnscope.scan(model, tok, TEXTS, batch_size=4).to_pylist()
    tok.padding_side = "left"
    try:
        left = attnscope.scan(model, tok, TEXTS, batch_size=4).to_pylist()
    finally:
        tok.padding_side = "right"
    assert_rows_close(left, right, rtol=1e-12)


def test_float32_minilm_within_1e5_of_texts_alone() -> None:
    transformers = pytest.importorskip("transformers")
    folder = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = TEXTS[:4]
    want = expected_rows(alone(model, tok, texts))
    got = attnscope.scan(model, tok, texts, batch_size=4).to_pylist()
    # float32 kernels: a batch and a text alone round differently (1e-7 in the weights), and
    # a near one-hot head's entropy (1e-3 nats) carries that as ~1e-5 of itself
    assert_rows_close(got, want, rtol=5e-5)


def test_truncation_counted_and_rows_cut(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny("bert")
    table = attnscope.scan(model, tok, TEXTS, batch_size=2, max_length=6)
    lengths = [len(ids) for ids in tok(TEXTS)["input_ids"]]
    counts = counts_of(table)
    assert counts["truncated"] == sum(n > 6 for n in lengths)
    assert counts["texts"] == len(TEXTS)
    assert counts["tokens"] == sum(min(n, 6) for n in lengths)
    assert table.column("count").to_pylist()[0] == counts["tokens"]
    want = expected_rows(alone(model, tok, TEXTS, max_length=6))
    assert_rows_close(table.to_pylist(), want, rtol=1e-9)


def test_empty_texts_are_skipped_and_counted(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny("bert")
    table = attnscope.scan(model, tok, ["", "Hello", "   "])
    assert counts_of(table) == {"texts": 1, "tokens": 3, "truncated": 0, "empty": 2}
    with pytest.raises(attnscope.AttnScopeError, match="no texts"):
        attnscope.scan(model, tok, ["", " \n"])
    with pytest.raises(attnscope.AttnScopeError, match="one string"):
        attnscope.scan(model, tok, "Hello")
    with pytest.raises(attnscope.AttnScopeError, match="max_length=9999"):
        attnscope.scan(model, tok, ["Hello"], max_length=9999)


def _one_hot_rows(batch: int, heads: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=generator, dtype=torch.float64)
    return torch.softmax(scores * 3, dim=-1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_row_statistics_count_positions_over_valid_tokens(side: str) -> None:
    weights = _one_hot_rows(1, 2, 5, seed=1)
    want = {
        s: torch.tensor(v, dtype=torch.float64) for s, v in row_values(weights[0]).items()
    }  # (heads, 5)
    padded = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    cut = slice(3, 8) if side == "left" else slice(0, 5)
    padded[0, :, cut, cut] = weights[0]
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, cut] = True
    got = row_statistics(padded, mask, mask)
    for s in STATS:
        torch.testing.assert_close(got[s][0][:, cut], want[s], rtol=1e-12, atol=1e-12)


def test_row_statistics_cross_attention_with_other_offsets() -> None:
    weights = torch.softmax(torch.randn(1, 1, 3, 4, dtype=torch.float64), -1)
    padded = torch.zeros(1, 1, 4, 6, dtype=torch.float64)
    padded[0, 0, 1:, 2:] = weights[0, 0]  # queries left-padded by 1, keys by 2
    queries = torch.tensor([[False, True, True, True]])
    keys = torch.tensor([[False, False, True, True, True, True]])
    got = row_statistics(padded, queries, keys)
    w = weights[0, 0]
    for i in range(3):
        assert got["distance"][0, 0, 1 + i] == pytest.approx(
            sum(float(w[i, j]) * abs(i - j) for j in range(4))
        )
        assert got["first"][0, 0, 1 + i] == pytest.approx(float(w[i, 0]))
        assert got["self"][0, 0, 1 + i] == pytest.approx(float(w[i, i]))
        assert got["previous"][0, 0, 1 + i] == pytest.approx(float(w[i, i - 1]) if i else 0.0)


def test_sums_merge_in_any_grouping_like_one_pass() -> None:
    maps = [_one_hot_rows(2, 3, 6, seed) for seed in range(4)]
    masks = [torch.tensor([[True] * 6, [True] * 4 + [False] * 2]) for _ in maps]
    for m in maps:  # item 1 is 4 tokens long, padded to 6
        m[1, :, 4:] = 0
        m[1, :, :, 4:] = 0
    one = Accumulator(max_length=8, top_k=3)
    parts = [Accumulator(max_length=8, top_k=3) for _ in maps]
    for n, (m, mask) in enumerate(zip(maps, masks, strict=True)):
        for acc in (one, parts[n]):
            acc.begin(torch.tensor([2 * n, 2 * n + 1]), mask)
            acc("a", "self", m)
            acc.end()
    merged = Accumulator(max_length=8, top_k=3)
    for part in (parts[2], parts[0], parts[3], parts[1]):
        merged.merge(Accumulator.from_json(part.to_json(), 8, 3))
    # brute force: every valid row of every map, and every text's mean
    rows: dict[str, list[list[float]]] = {s: [[], [], []] for s in STATS}
    texts: dict[str, list[list[tuple[float, int]]]] = {s: [[], [], []] for s in STATS}
    for n, m in enumerate(maps):
        for item, length in ((0, 6), (1, 4)):
            values = row_values(m[item, :, :length, :length])
            for s in STATS:
                for head in range(3):
                    rows[s][head] += values[s][head]
                    texts[s][head].append((sum(values[s][head]) / length, 2 * n + item))
    for acc in (one, merged):
        sums = acc.modules["a"]
        assert sums.count == 4 * 10
        for k, s in enumerate(STATS):
            for head in range(3):
                mean = sum(rows[s][head]) / 40
                std = math.sqrt(sum((v - mean) ** 2 for v in rows[s][head]) / 40)
                assert float(sums.mean[k, head]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
                assert float(sums.std()[k, head]) == pytest.approx(std, rel=1e-9, abs=1e-15)
                best = sorted(texts[s][head], key=lambda t: (-t[0], t[1]))[:3]
                assert sums.top_text[k, head].tolist() == [t for _, t in best]
                assert sums.top_value[k, head].tolist() == pytest.approx([v for v, _ in best])
        assert int(sums.hist.sum()) == 5 * 3 * 40  # every valid row in one bin per head


def test_sums_stay_the_same_size_however_many_texts() -> None:
    sizes = []
    for batches in (3, 60):
        acc = Accumulator(max_length=8, top_k=2)
        for n in range(batches):
            acc.begin(torch.tensor([n]), torch.ones(1, 5, dtype=torch.bool))
            acc("a", "self", _one_hot_rows(1, 2, 5, n))
            acc.end()
        sums = acc.modules["a"]
        held = (sums.mean, sums.m2, sums.hist, sums.top_value, sums.top_text)
        sizes.append(sum(t.numel() for t in held))
    assert sizes[0] == sizes[1] == 5 * 2 * (2 + 40 + 2 + 2)
    assert isinstance(HeadSums("self", 2, 2).mean, torch.Tensor)


def test_bfloat16_maps_are_measured_in_float32(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny("bert", torch.bfloat16)
    want = expected_rows(alone(model, tok, TEXTS[:3]))  # from the bfloat16 maps, in float64
    got = attnscope.scan(model, tok, TEXTS[:3], batch_size=1).to_pylist()
    assert_rows_close(got, want, rtol=1e-5)


def test_a_call_over_other_positions_is_refused_by_name() -> None:
    acc = Accumulator(max_length=8, top_k=2)
    acc.begin(torch.tensor([0]), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(attnscope.AttnScopeError, match=r"'pool' attends from 2 to 4 .*exclude="):
        acc("pool", "self", torch.full((1, 1, 2, 4), 0.25))


def test_pyarrow_is_an_extra_imported_only_when_a_table_is_built(
    tok,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = "import sys, attnscope; print(sorted({'pyarrow', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(attnscope.AttnScopeError, match=r"pip install 'attnscope\[scan\]'"):
        attnscope.scan(tiny("bert"), tok, ["Hello"])


@pytest.mark.parametrize(("queries", "keys"), [(5, 3), (3, 5), (1, 4)])
def test_row_statistics_of_unequal_lengths(queries: int, keys: int) -> None:
    weights = torch.softmax(torch.randn(2, 3, queries, keys, dtype=torch.float64), -1)
    got = row_statistics(weights)  # no padding: the diagonal path
    masked = row_statistics(  # keys padded on the left only: the general (gather) path
        torch.nn.functional.pad(weights, (1, 0, 0, 1)),
        torch.tensor([[True] * queries + [False]] * 2),
        torch.tensor([[False] + [True] * keys] * 2),
    )
    for item in range(2):
        want = row_values(weights[item])
        for s in STATS:
            expected = torch.tensor(want[s], dtype=torch.float64)
            torch.testing.assert_close(got[s][item], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(masked[s][item, :, :queries], expected)
