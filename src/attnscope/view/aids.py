"""Reading aids in the page's data: word groups and a lazy capture's queries and keys.

Design note
-----------
*Words.* Each map carries the word groups of its query and key axes (``attnscope.words``,
read from the labels' sub-word markers) when some word has more than one token. The page
merges the map it shows on the fly with the same convention as ``AttentionMaps.merge_tokens``
(rows averaged, columns summed), so nothing is embedded twice.

*Queries and keys.* A lazy capture keeps q and k (``AttentionMaps.queries_keys``); the page's
query/key view shows, for one head and one query, the q vector, every key's k vector, the terms
``q ⊙ k`` and their sum (the pre-mask score) beside the weight the map holds. They are float32
per head, embedded while they fit ``qk_bytes``; what does not fit is left out and said so.
"""

from __future__ import annotations

import base64

import torch

from ..errors import AttnScopeError
from ..maps import AttentionMaps
from ..words import groups_from_tokens, word_labels


def word_entry(labels: list[str]) -> dict[str, object] | None:
    """``{"groups", "labels"}`` for one axis, or None when every word is one token."""
    groups = groups_from_tokens(labels)
    if len(groups) == len(labels):
        return None
    return {"groups": groups, "labels": word_labels(labels, groups)}


def query_keys(
    attn: AttentionMaps, name: str, batch: int, budget: int
) -> tuple[dict[str, object] | None, int, str]:
    """The page's q and k of ``name`` (or None), the bytes they take, and why they are absent."""
    if not attn.lazy or len(attn.calls(name)) != 1:
        return None, 0, "" if not attn.lazy else f"{name}: several calls"
    try:
        q, k = attn.queries_keys(name)
    except AttnScopeError as error:
        return None, 0, str(error)
    q = q[batch].detach().to("cpu", torch.float32).contiguous()
    k = k[batch].detach().to("cpu", torch.float32).contiguous()
    cost = (q.numel() + k.numel()) * 4 * 4 // 3
    if cost > budget:
        return None, 0, f"{name}: over the query/key budget"
    heads, _, dim = q.shape
    entry = {
        "dim": dim,
        "q": [_b64(q[h].numpy().tobytes()) for h in range(heads)],
        "k": [_b64(k[h].numpy().tobytes()) for h in range(heads)],
    }
    return entry, cost, ""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
