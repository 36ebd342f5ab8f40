"""Lazy weights: what is needed to compute one call's attention weights, computed on access.

A lazy capture keeps, per attention call, the tensors its recompute reads (``held``: the
queries and keys the kernel computed or saw, else the inputs and the projection, and the
masks) instead of the (batch, heads, query, key) weights, so it holds O(L) per call instead of
O(L²) and costs almost nothing during the forward. The weights are computed whenever they are
read, exactly as an eager capture computes them. The PyTorch adapters keep copies (from
``attnscope.pool``), so a later optimizer step or a reused input buffer changes nothing. A
tensor held as the model gave it (the q and k reaching ``scaled_dot_product_attention``) that
is later changed in place (a static KV cache, say) would give other weights, so each held
tensor keeps its version counter and a change raises instead (an inference tensor has none: it
can only be changed inside ``torch.inference_mode``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .calls import AttentionCall
from .errors import AttnScopeError


class LazyWeights:
    """One call's weights, computed on access with the capture's heads, rows, device and dtype."""

    def __init__(
        self,
        name: str,
        call: AttentionCall,
        heads: list[int] | None,
        rows: Tensor | None,
        device: torch.device,
        dtype: torch.dtype | None,
    ) -> None:
        self.name = name
        self._call = call
        self._heads = heads
        self._rows = rows
        self._device = device
        self._dtype = dtype
        self._versions = [_version(t) for t in call.held]
        batch, heads_total, queries, keys = call.shape
        self.shape = torch.Size(
            (
                batch,
                heads_total if heads is None else len(heads),
                queries if rows is None else rows.numel(),
                keys,
            )
        )
        self.dtype = dtype or call.dtype

    def dim(self) -> int:
        return 4

    def materialize(self) -> Tensor:
        """Compute the weights now (nothing is cached: reading twice computes twice)."""
        self._check_unchanged()
        return finish(self._call.compute(self._rows), self._heads, self._device, self._dtype)

    def terms(self) -> tuple[Tensor, Tensor]:
        """The scaled per-head queries (of the captured rows) and keys the weights come from:
        (batch, heads, query, dim) and (batch, heads, key, dim) (``AttentionCall.terms``)."""
        if self._call.terms is None:
            raise AttnScopeError(
                f"{self.name}: its adapter does not give this call's queries and keys (only "
                "its weights); queries_keys() works for sdpa and torch.nn attention"
            )
        self._check_unchanged()
        q, k = self._call.terms()
        if self._rows is not None:
            q = q[:, :, self._rows]
        return (
            finish(q, self._heads, self._device, self._dtype),
            finish(k, self._heads, self._device, self._dtype),
        )

    def _check_unchanged(self) -> None:
        for tensor, version in zip(self._call.held, self._versions, strict=True):
            if _version(tensor) != version:
                raise AttnScopeError(
                    f"{self.name}: a tensor this lazy capture holds was changed in place after "
                    "the forward (e.g. a static KV cache), so its weights can no longer be "
                    "computed exactly; capture with lazy=False"
                )

    @property
    def nbytes(self) -> int:
        """Bytes of the held tensors (memory two of them share counted once)."""
        return union_bytes(self.held_ranges())

    def held_ranges(self) -> set[tuple[int, int, int]]:
        """The byte ranges the held tensors reach, as (storage address, start, end): views of
        one buffer (q and k cut from a packed projection, a mask several calls hold) overlap
        there, and ``union_bytes`` counts their memory once."""
        ranges = set()
        for t in self._call.held:
            if t.numel() == 0:
                continue
            storage = t.untyped_storage().data_ptr()
            start = t.data_ptr() - storage
            ranges.add((storage, start, start + _span_bytes(t)))
        return ranges


def union_bytes(ranges: set[tuple[int, int, int]]) -> int:
    """Bytes covered by (storage, start, end) ranges, overlaps counted once.

    >>> union_bytes({(0, 0, 10), (0, 5, 20), (1, 0, 4)})
    24
    """
    total = 0
    last: tuple[int, int] | None = None  # (storage, end) of the run being counted
    for storage, start, end in sorted(ranges):
        if last is not None and last[0] == storage and start < last[1]:
            if end > last[1]:
                total += end - last[1]
                last = (storage, end)
            continue
        total += end - start
        last = (storage, end)
    return total


def _version(t: Tensor) -> int | None:
    """``t``'s version counter; None for an inference tensor, which has none (and can only be
    changed inside ``torch.inference_mode``)."""
    return None if t.is_inference() else t._version


def _span_bytes(t: Tensor) -> int:
    """The bytes a view reaches in its storage: a broadcast (stride 0) mask counts once, and a
    piece of a larger block (``attnscope.pool``) only itself."""
    reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return (reach + 1) * t.element_size()


def finish(
    weights: Tensor, heads: list[int] | None, device: torch.device, dtype: torch.dtype | None
) -> Tensor:
    """Keep the selected heads, detach, move and cast: what every capture stores."""
    if heads is not None:
        weights = weights[:, heads]
    return weights.detach().to(device=device, dtype=dtype or weights.dtype)
