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

In generation with a KV cache each decoding step's keys are a new tensor, the cache so far plus
one position (transformers' ``DynamicCache`` concatenates), so keeping every step's keys held
O(L²) a layer, more than a full capture's maps (GPT-2 small, 128 new tokens: 364 MB against
6 MB). So where a module's next call holds a tensor whose first positions along dim -2 equal
(``torch.equal``) one its last call holds, the last call reads a view of the new one and lets
its own go (``LazyWeights.follow``); the calls before it read the same view through one
``Grown`` holder, which each step points at the newest tensor, so a step costs one compare and
no walk over the earlier calls. A cache reordered between steps (beam search) or changed in
place shares nothing, and the newest cache changed in place after the capture raises for
every call that reads it. Masks, which grow along the keys' axis (and, with position biases
as T5's, carry a row per query), are kept per call. Adapters take part by giving their calls
a ``reader`` (``calls.Reader``); sdpa's do.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from .calls import AttentionCall, Compute, Terms
from .errors import AttnScopeError


class Grown:
    """The newest keys of a module whose calls' keys grew step by step (a KV cache): the
    tensor its earlier calls read their first positions of, and its version counter then."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor, self.version = tensor, _version(tensor)


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
        self._compute: Compute | None = call.compute  # None: from _reader, once it reads views
        self._terms, self._reader = call.terms, call.reader
        self._held: list[Tensor | None] = list(call.held)  # None: read through _links
        self._versions = [_version(t) for t in call.held]
        self._links: list[tuple[Grown, int] | None] | None = None  # (cache, positions)
        self._heads = heads
        self._rows = rows
        self._device = device
        self._dtype = dtype
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

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyWeights:
        """A copy that reads the same held tensors, guarded the same way: a change to them
        refuses in both. Copying them would not keep that guard: a copied tensor's version
        counter starts anew, a copied view's apart from its copied base (a change through
        the base would go unseen), and an adapter's closure would still read the originals.
        What is held is the model's tensors or the capture's own copies, never changed by
        attnscope, so sharing them costs nothing."""
        other = copy.copy(self)
        memo[id(self)] = other
        other._held, other._versions = list(self._held), list(self._versions)
        other._links = None if self._links is None else list(self._links)
        return other

    def materialize(self) -> Tensor:
        """Compute the weights now (nothing is cached: reading twice computes twice)."""
        self._check_unchanged()
        compute, _ = self._computing()
        return finish(compute(self._rows), self._heads, self._device, self._dtype)

    def terms(self) -> tuple[Tensor, Tensor]:
        """The scaled per-head queries (of the captured rows) and keys the weights come from:
        (batch, heads, query, dim) and (batch, heads, key, dim) (``AttentionCall.terms``)."""
        _, terms = self._computing()
        if terms is None:
            raise AttnScopeError(
                f"{self.name}: its adapter does not give this call's queries and keys (only "
                "its weights); queries_keys() works for sdpa and torch.nn attention"
            )
        self._check_unchanged()
        q, k = terms()
        if self._rows is not None:
            q = q[:, :, self._rows]
        return (
            finish(q, self._heads, self._device, self._dtype),
            finish(k, self._heads, self._device, self._dtype),
        )

    def follow(self, later: LazyWeights, grown: list[Grown | None], count: bool = False) -> int:
        """Read views of ``later``'s tensors (this module's next call) where they begin with
        this call's own (a KV cache one step longer), and let this call's go; returns the
        bytes of its own it no longer holds where ``count``. ``grown`` holds, per held
        tensor, the cache earlier calls read this call's tensor through (None: none do); it
        then holds ``later``'s, so that a generation's calls all read the newest cache. A
        tensor changed in place since its call is not shared (reading it must still raise)."""
        ours, theirs = self._held, later._held
        caches: list[Grown | None] = [None] * len(theirs)
        before = self._own_bytes() if count else 0
        shared = False
        if self._reader is not None and len(ours) == len(theirs):
            for i, (old, new) in enumerate(zip(ours, theirs, strict=True)):
                if old is None or new is None or _version(old) != self._versions[i]:
                    continue
                if not _extends(new, old):
                    continue
                # earlier calls read this call's tensor through grown[i], where they do
                cache = grown[i] if i < len(grown) else None
                if cache is None:
                    cache = Grown(new)
                else:
                    cache.tensor, cache.version = new, _version(new)
                if self._links is None:
                    self._links = [None] * len(ours)
                self._links[i] = (cache, old.size(-2))
                ours[i] = None
                caches[i], shared = cache, True
        grown[:] = caches
        if not shared:
            return 0
        # nothing of this call may hold the old tensors: its compute and terms go with them
        assert self._reader is not None
        self._reader = self._reader.reading(tuple(ours))
        self._compute = self._terms = None
        return before - self._own_bytes() if count else 0

    def _own_bytes(self) -> int:
        """Bytes of the tensors this call holds itself (not those it reads through a cache,
        which the cache's newest call counts): views of one buffer counted once."""
        return union_bytes({r for t in self._held if t is not None for r in _ranges(t)})

    def _current(self) -> tuple[Tensor, ...]:
        """The tensors this call reads now: its own, and views of the caches it reads."""
        if self._links is None:
            return tuple(self._held)  # type: ignore[arg-type]  # no None without links
        return tuple(
            own if link is None else link[0].tensor.narrow(-2, 0, link[1])  # type: ignore[misc]
            for own, link in zip(self._held, self._links, strict=True)
        )

    def _computing(self) -> tuple[Compute, Terms | None]:
        if self._compute is not None:
            return self._compute, self._terms
        assert self._reader is not None
        reader = self._reader.reading(self._current())
        return reader.compute, reader.terms

    def _check_unchanged(self) -> None:
        changed = any(
            t is not None and _version(t) != version
            for t, version in zip(self._held, self._versions, strict=True)
        ) or any(
            link is not None and _version(link[0].tensor) != link[0].version
            for link in self._links or ()
        )
        if changed:
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
        return {r for t in self._current() for r in _ranges(t)}


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


def _extends(longer: Tensor, shorter: Tensor) -> bool:
    """Whether ``longer`` has more positions than ``shorter`` along dim -2 (where a KV cache
    grows) and its first ones equal it (``torch.equal``, to which 0.0 and -0.0 are equal: the
    weights are the same either way).

    >>> cache = torch.arange(6.0).reshape(1, 3, 2)
    >>> _extends(cache, cache[:, :2].clone()), _extends(cache, torch.zeros(1, 2, 2))
    (True, False)
    """
    if (
        longer.dim() != shorter.dim()
        or longer.dim() < 2
        or longer.size(-2) <= shorter.size(-2)  # a step's query, or keys that did not grow
        or longer.shape[:-2] != shorter.shape[:-2]
        or longer.size(-1) != shorter.size(-1)
        or longer.dtype != shorter.dtype
        or longer.device != shorter.device
    ):
        return False
    return torch.equal(longer.narrow(-2, 0, shorter.size(-2)), shorter)


def _ranges(t: Tensor) -> set[tuple[int, int, int]]:
    """The byte range ``t`` reaches in its storage, as (storage address, start, end)."""
    if t.numel() == 0:
        return set()
    storage = t.untyped_storage().data_ptr()
    start = t.data_ptr() - storage
    return {(storage, start, start + _span_bytes(t))}


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
