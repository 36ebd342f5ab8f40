"""One shard of texts through the model: tokenized, batched by length, streamed.

Design note
-----------
Texts are tokenized once without truncation (to count those over ``max_length``), sorted by
length (ties by id) so a batch carries little padding, and run in batches of ``batch_size``
under one ``capture.stream`` that hands every attention call to the ``Accumulator``: no map
outlives its call. The model's output is never read, so an sdpa call's output is computed from
the weights streamed (``exact_outputs=False``): one q·kᵀ and softmax per call, not the
kernel's and a recompute's. Batches are padded on the right whatever the tokenizer's own
side: a model with absolute positions (BERT, GPT-2) reads left padding as shifted positions,
and a scan needs no left padding; statistics count positions over the valid tokens either way
(``head_stats.row_statistics``). Given the same texts and batch size, the result does not
depend on where it runs; batch size and padding change it only by the kernels' rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..capture import stream
from ..errors import AttnScopeError
from ..filters import NamesFilter
from .aggregate import Accumulator


@dataclass
class ShardResult:
    """What one shard adds: its sums and its counts of texts, tokens, truncations."""

    sums: Accumulator
    texts: int = 0
    tokens: int = 0
    truncated: int = 0
    empty: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def merge(self, other: ShardResult) -> None:
        self.sums.merge(other.sums)
        self.texts += other.texts
        self.tokens += other.tokens
        self.truncated += other.truncated
        self.empty += other.empty
        self.skipped.update(other.skipped)

    def counts(self) -> dict[str, int]:
        return {
            "texts": self.texts,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "empty": self.empty,
        }


def model_limit(model: Any, tokenizer: Any) -> int | None:
    """The most tokens the model takes (its position table, the tokenizer's maximum)."""
    config = getattr(model, "config", None)
    limits = [
        getattr(config, "max_position_embeddings", None),
        getattr(config, "n_positions", None),
    ]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10**6:
        limits.append(model_max)
    return min((x for x in limits if isinstance(x, int) and x > 0), default=None)


def check_length(max_length: int, model: Any, tokenizer: Any) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise AttnScopeError(f"max_length must be an int of at least 2, got {max_length!r}")
    limit = model_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        raise AttnScopeError(
            f"max_length={max_length} but the model takes at most {limit} tokens; give "
            f"--max-length {limit} or less"
        )


class ShardRunner:
    """Runs shards of (id, text) through one model; reusable for every shard of a scan."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int,
        max_length: int,
        top_k: int,
        include: NamesFilter | None = None,
        exclude: NamesFilter | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise AttnScopeError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise AttnScopeError(f"top_k must be a positive int, got {top_k!r}")
        check_length(max_length, model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.top_k = top_k
        self.include = include
        self.exclude = exclude
        forward = getattr(model, "forward", None)
        self._parameters = set(inspect.signature(forward).parameters) if forward else set()
        config = getattr(model, "config", None)
        self._decoder_start = None
        if getattr(config, "is_encoder_decoder", False):
            start = getattr(config, "decoder_start_token_id", None)
            self._decoder_start = int(start if start is not None else 0)

    def run(
        self,
        records: Sequence[tuple[int, str | None]],
        on_batch: Callable[[int], None] | None = None,
    ) -> ShardResult:
        """The sums of ``records`` (id, text; None for an empty text, counted and skipped)."""
        result = ShardResult(Accumulator(self.max_length, self.top_k))
        texts = [(i, t) for i, t in records if t is not None]
        result.empty = len(records) - len(texts)
        if not texts:
            return result
        rows, result.truncated = self._tokenize([t for _, t in texts])
        tokenless = [n for n, row in enumerate(rows) if not row["input_ids"]]
        if tokenless:  # only characters the tokenizer drops: no text either
            result.empty += len(tokenless)
            dropped = set(tokenless)
            texts = [t for n, t in enumerate(texts) if n not in dropped]
            rows = [r for r in rows if r["input_ids"]]
            if not texts:
                return result
        order = sorted(range(len(texts)), key=lambda n: (len(rows[n]["input_ids"]), texts[n][0]))
        with (
            torch.no_grad(),
            stream(
                self.model,
                result.sums,
                include=self.include,
                exclude=self.exclude,
                exact_outputs=False,  # the model's output is never read: see stream()
            ) as attn,
        ):
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                batch = self._pad([rows[n] for n in chosen])
                mask = batch["attention_mask"].bool()
                target = None
                if self._decoder_start is not None:
                    batch["decoder_input_ids"] = torch.full((len(chosen), 1), self._decoder_start)
                    target = torch.ones(len(chosen), 1, dtype=torch.bool)
                result.sums.begin(torch.tensor([texts[n][0] for n in chosen]), mask, target)
                self._forward(batch)
                result.sums.end()
                result.texts += len(chosen)
                result.tokens += int(mask.sum())
                if on_batch is not None:
                    on_batch(len(chosen))
        result.skipped.update(attn.skipped)
        if not result.sums.modules:
            raise AttnScopeError(
                f"no attention was recorded in {type(self.model).__name__}"
                + (f" (seen but not mapped: {attn.skipped})" if attn.skipped else "")
                + "; scan needs a model whose attention attnscope.capture records"
            )
        return result

    def _tokenize(self, texts: list[str]) -> tuple[list[dict[str, list[int]]], int]:
        """Each text's tokens, cut to ``max_length`` where longer, and how many were cut."""
        try:
            full = self.tokenizer(texts, truncation=False, verbose=False)
            lengths = [len(ids) for ids in full["input_ids"]]
            over = [n for n, length in enumerate(lengths) if length > self.max_length]
            cut = {}
            if over:
                short = self.tokenizer(
                    [texts[n] for n in over],
                    truncation=True,
                    max_length=self.max_length,
                    verbose=False,
                )
                cut = {n: m for m, n in enumerate(over)}
        except (ValueError, TypeError, KeyError) as error:
            raise AttnScopeError(
                f"the model's tokenizer cannot encode these texts ({error})"
            ) from None
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
        rows: list[dict[str, list[int]]] = []
        for n in range(len(texts)):
            source, at = (short, cut[n]) if n in cut else (full, n)
            rows.append({k: list(source[k][at]) for k in keys})
        return rows, len(over)

    def _pad(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:  # GPT-2's tokenizer has none: any id will do, the mask hides it
            pad_id = getattr(self.tokenizer, "eos_token_id", None) or 0
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([r[key] + [fill] * (length - len(r[key])) for r in rows])
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]
            )
        if self._parameters and "token_type_ids" not in self._parameters:
            batch.pop("token_type_ids", None)
        return batch

    def _forward(self, batch: dict[str, torch.Tensor]) -> None:
        try:
            self.model(**batch)
        except (ValueError, TypeError, IndexError) as error:
            raise AttnScopeError(
                f"the model failed on a batch of texts ({type(error).__name__}: {error}); check "
                "that the model and the tokenizer belong together"
            ) from None
