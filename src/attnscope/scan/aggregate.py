"""Per-head statistics of a corpus as sums that merge: batches, shards and engines agree.

Design note
-----------
``Accumulator`` is the ``consume`` of ``attnscope.capture.stream``: each attention call's
weights arrive as the call finishes, are reduced at once to per-row statistics
(``head_stats.row_statistics``, positions over the valid tokens) and dropped. What it keeps
per (module, head, statistic) is constant in the corpus size:

- the number of valid query rows, their mean and ``M2`` (the sum of squared deviations),
  float64, merged with Chan et al.'s pairwise update, so a standard deviation needs no second
  pass and merging in any grouping gives the same numbers to rounding;
- a histogram over fixed bins (the ranges depend only on ``max_length``), for the report;
- the ``top_k`` texts with the highest per-text mean (over that text's valid rows), ties to
  the lower text id: the top-k of a union is the top-k of the parts' top-ks.

Which rows are valid comes from the batch's attention masks, set by ``begin`` before each
forward: a call's queries and keys are matched to the input's mask (self and causal attention)
or, for an encoder-decoder, to the decoder's (its queries) and the input's (cross keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import AttnScopeError
from ..head_stats import STATISTICS, row_statistics

BINS = 40
FORMAT = 1


def bin_ranges(max_length: int) -> dict[str, tuple[float, float]]:
    """The histogram range of each statistic for texts of at most ``max_length`` tokens.

    >>> bin_ranges(8)["distance"], bin_ranges(8)["first"]
    ((0.0, 7.0), (0.0, 1.0))
    """
    top = max(1, max_length - 1)
    return {
        "entropy": (0.0, math.log(max(2, max_length))),
        "distance": (0.0, float(top)),
        "first": (0.0, 1.0),
        "previous": (0.0, 1.0),
        "self": (0.0, 1.0),
    }


@dataclass
class HeadSums:
    """One module's sums over every head: moments, histograms and top-k per statistic."""

    kind: str
    heads: int
    top_k: int
    count: int = 0  # valid query rows, the same for every head
    mean: Tensor = field(default_factory=lambda: torch.zeros(0))  # (stats, heads) float64
    m2: Tensor = field(default_factory=lambda: torch.zeros(0))  # (stats, heads) float64
    hist: Tensor = field(default_factory=lambda: torch.zeros(0))  # (stats, heads, BINS) int64
    top_value: Tensor = field(default_factory=lambda: torch.zeros(0))  # (stats, heads, <=k)
    top_text: Tensor = field(default_factory=lambda: torch.zeros(0))  # (stats, heads, <=k)

    def __post_init__(self) -> None:
        shape = (len(STATISTICS), self.heads)
        if self.mean.numel() == 0:
            self.mean = torch.zeros(shape, dtype=torch.float64)
            self.m2 = torch.zeros(shape, dtype=torch.float64)
            self.hist = torch.zeros((*shape, BINS), dtype=torch.int64)
            self.top_value = torch.zeros((*shape, 0), dtype=torch.float64)
            self.top_text = torch.zeros((*shape, 0), dtype=torch.int64)

    def add_moments(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Chan's update: these sums and another group's (count, mean, M2) as one group."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def add_top(self, values: Tensor, texts: Tensor) -> None:
        """Candidates (stats, heads, n) with their text ids (n,) or (stats, heads, n)."""
        if texts.dim() == 1:
            texts = texts.expand_as(values)
        values = torch.cat([self.top_value, values], dim=-1)
        texts = torch.cat([self.top_text, texts], dim=-1)
        order = torch.sort(texts, dim=-1, stable=True).indices  # ties: lower id first
        values, texts = values.gather(-1, order), texts.gather(-1, order)
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., : self.top_k]
        self.top_value, self.top_text = values.gather(-1, order), texts.gather(-1, order)

    def merge(self, other: HeadSums) -> None:
        if other.heads != self.heads:
            raise AttnScopeError(f"cannot merge sums over {other.heads} heads into {self.heads}")
        self.add_moments(other.count, other.mean, other.m2)
        self.hist += other.hist
        self.add_top(other.top_value, other.top_text)

    def std(self) -> Tensor:
        """Population standard deviation over the rows (ddof 0): (stats, heads)."""
        return (self.m2 / max(1, self.count)).clamp_min(0).sqrt()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "heads": self.heads,
            "count": self.count,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "hist": self.hist.tolist(),
            "top_value": self.top_value.tolist(),
            "top_text": self.top_text.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], top_k: int) -> HeadSums:
        heads = int(data["heads"])
        stats = len(STATISTICS)

        def tensor(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
            value = torch.tensor(data[key], dtype=dtype)
            if value.numel() == 0:
                return torch.zeros(shape, dtype=dtype)
            return value.reshape(shape)

        kept = len(data["top_text"][0][0]) if heads else 0
        return cls(
            kind=str(data["kind"]),
            heads=heads,
            top_k=top_k,
            count=int(data["count"]),
            mean=tensor("mean", torch.float64, (stats, heads)),
            m2=tensor("m2", torch.float64, (stats, heads)),
            hist=tensor("hist", torch.int64, (stats, heads, BINS)),
            top_value=tensor("top_value", torch.float64, (stats, heads, kept)),
            top_text=tensor("top_text", torch.int64, (stats, heads, kept)),
        )


class Accumulator:
    """``consume(name, kind, weights)`` for ``capture.stream``; ``begin``/``end`` each batch.

    A call's map is reduced to its rows' statistics at once (``row_statistics``) and dropped.
    The rows' statistics of the batch's calls, (stats, batch, heads, query) each, a map's
    size divided by its keys, wait for ``end``, which folds them into the sums for all the
    modules together: one run of a dozen small operations a batch instead of one a call.

    >>> acc = Accumulator(max_length=4, top_k=2)
    >>> w = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    >>> acc.begin(torch.tensor([7]), torch.ones(1, 2, dtype=torch.bool))
    >>> acc("layer", "self", w)
    >>> acc.end()
    >>> acc.modules["layer"].count, acc.modules["layer"].mean[STATISTICS.index("first")].item()
    (2, 0.75)
    """

    def __init__(self, max_length: int, top_k: int) -> None:
        self.max_length = max_length
        self.top_k = top_k
        self.modules: dict[str, HeadSums] = {}
        self.ranges = bin_ranges(max_length)
        self._ids: Tensor | None = None
        self._input: Tensor | None = None
        self._target: Tensor | None = None
        self._bins: tuple[Tensor, Tensor] | None = None
        # this batch's calls: (name, query mask, rows' statistics (stats, batch, heads, query))
        self._pending: list[tuple[str, Tensor, Tensor]] = []
        self._scratch: Tensor | None = None  # one map's worth, reused call after call

    def begin(self, ids: Tensor, input_mask: Tensor, target_mask: Tensor | None = None) -> None:
        """The next batch: its text ids (batch,), the input's mask (batch, length) and, for an
        encoder-decoder, the decoder's (batch, target length); True where a token is real."""
        self._ids = ids.long()
        self._input = input_mask.bool()
        self._target = None if target_mask is None else target_mask.bool()
        self._pending = []

    def __call__(self, name: str, kind: str, weights: Tensor) -> None:
        if self._ids is None or self._input is None:
            raise AttnScopeError("Accumulator got weights outside begin()/end()")
        _, heads, queries, keys = weights.shape
        query_mask, key_mask = self._masks_of(name, kind, queries, keys)
        dtype = weights.dtype if weights.dtype == torch.float64 else torch.float32
        if self._scratch is None or self._scratch.numel() < weights.numel():
            self._scratch = torch.empty(weights.numel(), dtype=dtype)
        if self._scratch.dtype != dtype:
            self._scratch = self._scratch.to(dtype)
        per_row = row_statistics(weights, query_mask, key_mask, scratch=self._scratch)
        sums = self.modules.get(name)
        if sums is None:
            sums = self.modules[name] = HeadSums(kind, heads, self.top_k)
        elif sums.heads != heads:
            raise AttnScopeError(f"{name!r} was called with {sums.heads} and {heads} heads")
        values = torch.stack([per_row[s] for s in STATISTICS])  # (stats, b, h, q)
        self._pending.append((name, query_mask, values))

    def end(self) -> None:
        """Close the batch: its calls' rows join the sums, per-text means each head's top-k."""
        if self._ids is None:
            return
        groups: dict[tuple[int, int, torch.dtype], list[tuple[str, Tensor, Tensor]]] = {}
        for name, query_mask, values in self._pending:
            key = (id(query_mask), values.size(2), values.dtype)
            groups.setdefault(key, []).append((name, query_mask, values))
        texts: dict[str, tuple[Tensor, Tensor]] = {}  # per module: per-text sums and rows
        for calls in groups.values():
            self._fold(calls, texts)
        for name, (text_sums, text_rows) in texts.items():
            seen = text_rows > 0
            if not bool(seen.any()):
                continue
            means = text_sums[:, :, seen] / text_rows[seen]  # (stats, heads, b')
            self.modules[name].add_top(means, self._ids[seen])
        self._ids, self._input, self._target, self._pending = None, None, None, []

    def _fold(
        self, calls: list[tuple[str, Tensor, Tensor]], texts: dict[str, tuple[Tensor, Tensor]]
    ) -> None:
        """Calls over the same query rows and heads: the moments and histograms of their valid
        rows and their per-text sums, computed for all of them at once."""
        query_mask = calls[0][1]
        flat = query_mask.reshape(-1).nonzero()[:, 0]  # valid rows, (item, query) order
        count = flat.numel()
        if not count:
            return
        stacked = torch.stack([values for _, _, values in calls])  # (calls, stats, b, h, q)
        n, stats, _, heads, _ = stacked.shape
        valid = stacked.transpose(2, 3).reshape(n, stats, heads, -1).index_select(-1, flat)
        exact = valid.double()
        mean = exact.mean(dim=-1)
        deviation = exact - mean[..., None]
        m2 = deviation.mul_(deviation).sum(dim=-1)
        hist = self._histogram(valid)
        # per text, in the kernel's dtype: a text's mean ranks it, to its last digits or so
        rows = query_mask[:, None, :].to(stacked.dtype)
        text_sums = (stacked * rows).sum(dim=-1).double().transpose(2, 3)  # (calls, s, h, b)
        text_rows = query_mask.sum(dim=-1).to(torch.float64)
        for index, (name, _, _) in enumerate(calls):
            sums = self.modules[name]
            sums.add_moments(count, mean[index], m2[index])
            sums.hist += hist[index]
            held = texts.get(name)  # a module called again in this forward (shared weights)
            if held is None:
                texts[name] = (text_sums[index], text_rows)
            else:
                texts[name] = (held[0] + text_sums[index], held[1] + text_rows)

    def _masks_of(self, name: str, kind: str, queries: int, keys: int) -> tuple[Tensor, Tensor]:
        assert self._input is not None
        inputs, target = self._input, self._target
        length = inputs.size(1)
        if kind == "cross" and target is not None:
            pairs = [(target, inputs)]
        elif target is not None:
            pairs = [(inputs, inputs), (target, target)]
        else:
            pairs = [(inputs, inputs)]
        for query_mask, key_mask in pairs:
            if query_mask.size(1) == queries and key_mask.size(1) == keys:
                return query_mask, key_mask
        raise AttnScopeError(
            f"{name!r} attends from {queries} to {keys} positions, but the batch has "
            f"{length} input tokens{'' if target is None else f' and {target.size(1)} target'}"
            ": scan measures attention over the text's own tokens; leave that module out "
            "(exclude=)"
        )

    def _histogram(self, valid: Tensor) -> Tensor:
        """Counts per (..., statistic, head, bin) of the valid rows' values (..., stats, heads,
        rows)."""
        if self._bins is None or self._bins[0].dtype != valid.dtype:
            lows = torch.tensor([self.ranges[s][0] for s in STATISTICS], dtype=valid.dtype)
            highs = torch.tensor([self.ranges[s][1] for s in STATISTICS], dtype=valid.dtype)
            self._bins = (lows.view(-1, 1, 1), (BINS / (highs - lows)).view(-1, 1, 1))
        low, scale = self._bins
        index = torch.addcmul(-low * scale, valid, scale).clamp_(0, BINS - 1).long()  # floors
        groups = valid[..., 0].numel()  # one run of bins per (..., statistic, head)
        index += (torch.arange(groups) * BINS).view(*valid.shape[:-1], 1)
        return torch.bincount(index.view(-1), minlength=groups * BINS).view(*valid.shape[:-1], BINS)

    def merge(self, other: Accumulator) -> None:
        """Fold another accumulator's sums into this one (modules in first-seen order)."""
        for name, sums in other.modules.items():
            mine = self.modules.get(name)
            if mine is None:
                self.modules[name] = HeadSums.from_json(sums.to_json(), self.top_k)
            else:
                mine.merge(sums)

    def to_json(self) -> dict[str, Any]:
        return {name: sums.to_json() for name, sums in self.modules.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any], max_length: int, top_k: int) -> Accumulator:
        acc = cls(max_length, top_k)
        acc.modules = {name: HeadSums.from_json(value, top_k) for name, value in data.items()}
        return acc

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per (module, head): kind, count, the means and their standard deviations."""
        for name, sums in self.modules.items():
            std = sums.std()
            for head in range(sums.heads):
                row: dict[str, Any] = {
                    "module": name,
                    "head": head,
                    "kind": sums.kind,
                    "count": sums.count,
                }
                for index, stat in enumerate(STATISTICS):
                    row[stat] = float(sums.mean[index, head])
                for index, stat in enumerate(STATISTICS):
                    row[f"{stat}_std"] = float(std[index, head])
                yield row

    def top_rows(self) -> Iterator[dict[str, Any]]:
        """Per (module, head, statistic), the top-k texts, highest per-text mean first."""
        for name, sums in self.modules.items():
            for head in range(sums.heads):
                for index, stat in enumerate(STATISTICS):
                    values = sums.top_value[index, head].tolist()
                    texts = sums.top_text[index, head].tolist()
                    for rank, (value, text) in enumerate(zip(values, texts, strict=True), 1):
                        yield {
                            "module": name,
                            "head": head,
                            "statistic": stat,
                            "rank": rank,
                            "id": int(text),
                            "value": float(value),
                        }
