"""Word-level attention from sub-word tokens (``AttentionMaps.merge_tokens``).

Design note
-----------
A word split into several tokens gets one row and one column, following Clark et al. (2019,
"What does BERT look at?"): attention *to* a word is the **sum** over its tokens (its columns
are added), attention *from* a word is the **mean** over its tokens (its rows are averaged).
A row of probabilities therefore still sums to 1, and a zero row (a padded query) stays zero.
With a (words, tokens) averaging matrix ``A`` and a (tokens, words) one-hot matrix ``S`` the
merged map is ``A @ W @ S``, one matmul pair per module, every head and batch item at once.

Groups are lists of token positions, one list per word, each position in exactly one list
(they need not be contiguous). They come from the caller, from a tokenizer's ``word_ids()``
(``groups_from_word_ids``), or from the markers of the usual sub-word schemes
(``groups_from_tokens``): WordPiece continues a word with ``##``; GPT-2's byte-level BPE
(``Ġ``) and SentencePiece (``▁``) start one. Special tokens (``[CLS]``, ``<s>``, ``<pad>``,
...) are always words of their own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import AttnScopeError

if TYPE_CHECKING:
    from .maps import AttentionMaps

Groups = list[list[int]]
_SPECIAL = re.compile(r"^(\[[A-Za-z_]+\]|<[^<>\s]*>|<\|[^<>\s]*\|>)$")
_STARTS = ("Ġ", "▁")


def groups_from_tokens(tokens: Sequence[str]) -> Groups:
    """Word groups read from sub-word markers (``##`` continues; ``Ġ`` / ``▁`` start a word).

    >>> groups_from_tokens(["[CLS]", "play", "##ing", "cards", "[SEP]"])
    [[0], [1, 2], [3], [4]]
    >>> groups_from_tokens(["The", "Ġplay", "ing", "Ġcard", "s"])
    [[0], [1, 2], [3, 4]]
    >>> groups_from_tokens(["▁Hel", "lo", "▁world", "</s>"])
    [[0, 1], [2], [3]]
    """
    tokens = [str(t) for t in tokens]
    if any(t.startswith("##") and len(t) > 2 for t in tokens):
        return _group(tokens, lambda t: not (t.startswith("##") and len(t) > 2))
    for marker in _STARTS:
        if any(t.startswith(marker) for t in tokens):
            return _group(tokens, lambda t, m=marker: t.startswith(m))
    return [[i] for i in range(len(tokens))]


def _group(tokens: list[str], starts_word: object) -> Groups:
    groups: Groups = []
    previous_special = True
    for index, token in enumerate(tokens):
        special = bool(_SPECIAL.match(token))
        if special or previous_special or starts_word(token):  # type: ignore[operator]
            groups.append([index])
        else:
            groups[-1].append(index)
        previous_special = special
    return groups


def groups_from_word_ids(word_ids: Sequence[int | None]) -> Groups:
    """Word groups from a fast tokenizer's ``encoding.word_ids()`` (None: a special token).

    >>> groups_from_word_ids([None, 0, 0, 1, None])
    [[0], [1, 2], [3], [4]]
    """
    groups: Groups = []
    where: dict[int, int] = {}
    for index, word in enumerate(word_ids):
        if word is None:
            groups.append([index])
        elif word in where:
            groups[where[word]].append(index)
        else:
            where[word] = len(groups)
            groups.append([index])
    return groups


def check_groups(groups: object, size: int, what: str) -> Groups:
    """``groups`` as lists of ints that cover ``0 .. size-1`` exactly once, or a clear error."""
    example = "e.g. [[0], [1, 2], [3]] for 4 tokens whose tokens 1 and 2 form one word"
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise AttnScopeError(f"{what} must be a list of lists of token positions, {example}")
    checked: Groups = []
    for group in groups:
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or not group:
            raise AttnScopeError(
                f"{what}: {group!r} is not a non-empty list of positions; {example}"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in group):
            raise AttnScopeError(f"{what}: {group!r} holds something other than ints; {example}")
        checked.append([int(i) for i in group])
    seen = sorted(i for group in checked for i in group)
    if seen != list(range(size)):
        missing = sorted(set(range(size)) - set(seen))[:5]
        twice = sorted({i for i in seen if seen.count(i) > 1})[:5]
        outside = sorted({i for i in seen if not 0 <= i < size})[:5]
        raise AttnScopeError(
            f"{what} must name each of the {size} positions exactly once; missing {missing}, "
            f"repeated {twice}, outside 0..{size - 1}: {outside}"
        )
    return checked


def word_labels(tokens: Sequence[str], groups: Groups) -> list[str]:
    """One label per word: its tokens joined, markers dropped.

    >>> word_labels(["[CLS]", "play", "##ing"], [[0], [1, 2]])
    ['[CLS]', 'playing']
    >>> word_labels(["Ġplay", "ing", "▁a"], [[0, 1], [2]])
    ['playing', 'a']
    """
    labels = []
    for group in groups:
        parts = []
        for position, index in enumerate(group):
            token = str(tokens[index])
            if token.startswith("##") and len(token) > 2 and position:
                token = token[2:]
            elif token.startswith(_STARTS) and len(token) > 1:
                token = token[1:]
            parts.append(token)
        labels.append("".join(parts))
    return labels


def merge(weights: Tensor, query_groups: Groups, key_groups: Groups) -> Tensor:
    """Merge (..., query, key) weights: rows averaged within query groups, columns summed
    within key groups.

    >>> w = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    >>> merge(w, [[0], [1, 2]], [[0], [1, 2]])
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """
    dtype = weights.dtype if weights.is_floating_point() else torch.float32
    average = torch.zeros(len(query_groups), weights.size(-2), dtype=dtype)
    for word, group in enumerate(query_groups):
        average[word, group] = 1.0 / len(group)
    total = torch.zeros(weights.size(-1), len(key_groups), dtype=dtype)
    for word, group in enumerate(key_groups):
        total[group, word] = 1.0
    device = weights.device
    return average.to(device) @ weights.to(dtype) @ total.to(device)


def merge_maps(
    attn: AttentionMaps,
    groups: Groups | None = None,
    target_groups: Groups | None = None,
    *,
    batch: int | None = None,
) -> AttentionMaps:
    """Word-level maps of ``attn``; see ``AttentionMaps.merge_tokens``."""
    from .maps import AttentionMaps

    if len(attn) == 0:
        raise AttnScopeError("nothing to merge: this AttentionMaps is empty")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)):
        raise AttnScopeError(f"batch must be an int (a batch item's index) or None, got {batch!r}")
    size = attn._shape(attn.names[0])[0]
    items = list(range(size)) if batch is None else [batch]
    if batch is not None and not 0 <= batch < size:
        raise AttnScopeError(f"batch={batch} but the maps have {size} batch items")
    sequences = {
        "tokens": _item_groups(attn, "tokens", groups, items),
        "target_tokens": _item_groups(attn, "target_tokens", target_groups, items),
    }
    merged: dict[str, Tensor] = {}
    kinds: dict[str, str] = {}
    for name in attn.names:
        if attn.rows(name) is not None:
            raise AttnScopeError(
                f"{name!r} was captured with rows=: only some query positions, which cannot be "
                "merged into words; capture every row to merge tokens"
            )
        weights = attn.display(name).weights[items]
        query_seq, key_seq = _sequences(attn, name)
        query_groups, key_groups = (
            _needed(sequences[query_seq], query_seq, name),
            _needed(sequences[key_seq], key_seq, name),
        )
        shape = weights.shape
        for what, grouping, count in (
            ("query", query_groups, shape[2]),
            ("key", key_groups, shape[3]),
        ):
            covered = sum(len(g) for g in grouping[1])
            if covered != count:
                raise AttnScopeError(
                    f"{name!r} has {count} {what} positions but the word groups cover "
                    f"{covered}; give groups for the whole sequence, padding included"
                )
        merged[name] = merge(weights, query_groups[1], key_groups[1])
        kinds[name] = attn.kind(name)
    maps = AttentionMaps.from_tensors(merged, kinds=kinds)
    source, target = sequences["tokens"], sequences["target_tokens"]
    return maps.with_tokens(
        None if source is None else source[2], None if target is None else target[2]
    )


Grouping = tuple[bool, Groups, list[str] | list[list[str]] | None]  # (given, groups, labels)


def _item_groups(
    attn: AttentionMaps, which: str, groups: Groups | None, items: list[int]
) -> Grouping | None:
    """One grouping shared by ``items``, with word labels; None when the sequence is unknown."""
    labels = getattr(attn, which)
    per_item = None
    if labels is not None:
        per_item = labels if labels and isinstance(labels[0], list) else [labels] * (max(items) + 1)
    if groups is not None:
        size = len(per_item[items[0]]) if per_item is not None else _length(attn, which)
        checked = check_groups(groups, size, which.replace("tokens", "groups"))
        if per_item is None:
            return True, checked, None
        named = [word_labels(per_item[i], checked) for i in items]
        return True, checked, named[0] if len(named) == 1 else named
    if per_item is None:
        return None
    found = [groups_from_tokens(per_item[i]) for i in items]
    if any(g != found[0] for g in found):
        raise AttnScopeError(
            f"the batch items split their {which} into different words; merge one item at a "
            "time (merge_tokens(batch=0)) or pass explicit groups"
        )
    words = [word_labels(per_item[i], found[0]) for i in items]
    return False, found[0], words[0] if len(words) == 1 else words


def _length(attn: AttentionMaps, which: str) -> int:
    """How long the ``tokens`` or ``target_tokens`` sequence is, read from the maps' shapes."""
    for name in attn.names:
        query_seq, key_seq = _sequences(attn, name)
        shape = attn._shape(name)
        if key_seq == which:
            return int(shape[3])
        if query_seq == which and attn.rows(name) is None:
            return int(shape[2])
    raise AttnScopeError(
        f"no module attends over {which}; drop "
        f"{'target_groups' if which == 'target_tokens' else 'groups'}"
    )


def _sequences(attn: AttentionMaps, name: str) -> tuple[str, str]:
    kind = attn.kind(name)
    if kind == "cross":
        return "target_tokens", "tokens"
    if kind == "causal" and attn.target_tokens is not None:
        return "target_tokens", "target_tokens"
    return "tokens", "tokens"


def _needed(grouping: Grouping | None, which: str, name: str) -> Grouping:
    if grouping is None:
        groups = "target_groups" if which == "target_tokens" else "groups"
        raise AttnScopeError(
            f"{name!r} needs word groups for its {which}: label the maps first "
            f"(attn.with_tokenizer(tokenizer, input_ids)) or pass {groups}=[[0], [1, 2], ...]"
        )
    return grouping


__all__ = [
    "check_groups",
    "groups_from_tokens",
    "groups_from_word_ids",
    "merge",
    "merge_maps",
    "word_labels",
]
