"""``AttentionMaps``: the one shape of data every view and analysis consumes.

Each attention module has a name (its qualified module path), a kind (``"self"``,
``"causal"`` or ``"cross"``) and one or more calls, each a (batch, heads, query, key) tensor.
Token labels are optional. The object holds tensors and strings only, never the model.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import torch
from torch import Tensor

from ._version import __version__
from .attribution import GradSlot
from .errors import AttnScopeError
from .filters import NamesFilter, filter_names
from .lazy import LazyWeights, union_bytes
from .serialization import read_safetensors, write_safetensors
from .spill import read_spill

KINDS = ("self", "causal", "cross")
FORMAT = "attnscope.maps"
FORMAT_VERSION = 1

Tokens = list[str] | list[list[str]]


class Displayed(NamedTuple):
    """What a view or figure shows for one module (``AttentionMaps.display``)."""

    weights: Tensor  # (batch, heads, query, key)
    note: str  # which calls these are, "" for a module called once


class AttentionMaps:
    """Per-head attention weights of named modules, in the order they were called.

    >>> maps = AttentionMaps.from_tensors({"layer0": torch.full((1, 2, 3, 3), 1 / 3)})
    >>> maps.names, maps.kind("layer0"), tuple(maps["layer0"].shape)
    (['layer0'], 'self', (1, 2, 3, 3))
    >>> maps.with_tokens(["a", "b", "c"]).labels("layer0")
    (['a', 'b', 'c'], ['a', 'b', 'c'])
    """

    def __init__(self) -> None:
        self._calls: dict[str, list[Tensor | LazyWeights]] = {}
        self._kinds: dict[str, str] = {}
        self._rows: dict[str, list[int] | None] = {}
        self._tokens: Tokens | None = None
        self._target_tokens: Tokens | None = None
        self._skipped: dict[str, str] = {}
        self._grads: dict[str, list[GradSlot]] = {}  # capture(grads=True): one per call
        self._norms: dict[str, list[Tensor | str]] = {}  # capture(norms=True): ‖f_h(x_j)‖

    # -- building ---------------------------------------------------------------------------

    def _skip(self, name: str, why: str) -> None:
        self._skipped.setdefault(name, why)

    @property
    def skipped(self) -> dict[str, str]:
        """{module name: why} for modules that ran in the capture but whose attention could not
        be mapped (a linear attention with no softmax, a kernel attnscope cannot see)."""
        return dict(self._skipped)

    def _append(
        self, name: str, kind: str, weights: Tensor | LazyWeights, rows: list[int] | None = None
    ) -> None:
        if kind not in KINDS:
            raise AttnScopeError(f"kind must be one of {KINDS}, got {kind!r} for {name!r}")
        if weights.dim() != 4:
            raise AttnScopeError(
                f"weights of {name!r} must be (batch, heads, query, key), got shape "
                f"{tuple(weights.shape)}"
            )
        self._calls.setdefault(name, []).append(weights)
        self._kinds.setdefault(name, kind)
        self._rows.setdefault(name, rows)

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, Tensor | Sequence[Tensor]],
        kinds: str | Mapping[str, str] = "self",
    ) -> AttentionMaps:
        """Wrap your own weights: ``{name: (batch, heads, query, key) tensor or list of calls}``.

        ``kinds`` is one kind for all names or a mapping from name to kind.
        """
        maps = cls()
        for name, value in tensors.items():
            kind = kinds if isinstance(kinds, str) else kinds.get(name)
            if kind is None:
                raise AttnScopeError(f"no kind given for {name!r}; pass kinds={{{name!r}: 'self'}}")
            calls = [value] if isinstance(value, Tensor) else list(value)
            if not calls:
                raise AttnScopeError(f"{name!r} has no tensor")
            for weights in calls:
                if not isinstance(weights, Tensor):
                    raise AttnScopeError(
                        f"{name!r}: expected torch.Tensor, got {type(weights).__name__}"
                    )
                maps._append(name, kind, weights.detach())
        return maps

    def _derive(
        self, names: Sequence[str], calls: Mapping[str, list[Tensor]] | None = None
    ) -> AttentionMaps:
        maps = AttentionMaps()
        for name in names:
            maps._calls[name] = list((calls or self._calls)[name])
            maps._kinds[name] = self._kinds[name]
            maps._rows[name] = self._rows.get(name)
            if calls is None:  # the same calls: their gradients and norms go with them
                if name in self._grads:
                    maps._grads[name] = self._grads[name]
                if name in self._norms:
                    maps._norms[name] = self._norms[name]
        maps._tokens, maps._target_tokens = self._tokens, self._target_tokens
        maps._skipped = dict(self._skipped)
        return maps

    # -- access -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Module names in the order they were first called."""
        return list(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._calls))

    def __contains__(self, name: object) -> bool:
        return name in self._calls

    def _check_name(self, name: str) -> None:
        if name in self._calls:
            return
        close = difflib.get_close_matches(str(name), self.names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        available = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
        raise AttnScopeError(f"no attention module named {name!r}.{hint} Available: {available}")

    def __getitem__(self, name: str) -> Tensor:
        self._check_name(name)
        calls = self._calls[name]
        if len(calls) > 1:
            how = (
                f", or attn.concat({name!r}) to join the steps of incremental decoding"
                if self.incremental(name)
                else f" (attn.calls({name!r})[-1] for the last): they are not incremental "
                f"steps, so attn.concat({name!r}) refuses them"
            )
            raise AttnScopeError(
                f"{name!r} was called {len(calls)} times in this capture; use "
                f"attn.calls({name!r}) for each call{how}"
            )
        return _resolve(calls[0])

    def calls(self, name: str) -> list[Tensor]:
        """Every call of ``name``, in order, each (batch, heads, query, key)."""
        self._check_name(name)
        return [_resolve(w) for w in self._calls[name]]

    def grad(self, name: str, call: int | None = None) -> Tensor:
        """∂loss/∂A of ``name``'s weights, shaped like ``attn[name]`` (its ``call``-th call
        where it ran more than once), from a backward run inside ``capture(model,
        grads=True)`` (``attnscope.attribution``)."""
        self._check_name(name)
        if name not in self._grads:
            raise AttnScopeError(
                f"no gradients were kept for {name!r}: capture with "
                "attnscope.capture(model, grads=True) and call loss.backward() inside the block"
            )
        return self._pick(name, self._grads[name], call).grad()

    def norms(self, name: str, call: int | None = None) -> Tensor:
        """Norm-weighted maps A_ij·‖f_h(x_j)‖ of ``name`` (Kobayashi et al. 2020), shaped
        like ``attn[name]``, from ``capture(model, norms=True)``."""
        self._check_name(name)
        if name not in self._norms:
            raise AttnScopeError(
                f"no value norms were kept for {name!r}: capture with "
                "attnscope.capture(model, norms=True)"
            )
        index = self._index(name, call)
        vector = self._norms[name][index]
        if isinstance(vector, str):
            raise AttnScopeError(f"no value norms for {name!r}: {vector}")
        weights = _resolve(self._calls[name][index])
        return weights * vector.to(weights.dtype)[:, :, None, :]

    def weighted(self, by: str) -> AttentionMaps:
        """The same modules' maps weighted another way, for every figure, view and analysis
        that takes maps: ``by="grads"`` gives (∂L/∂A ⊙ A)⁺ per head (the relevance Chefer et
        al. 2021b roll out; needs ``grads=True``), ``by="norms"`` gives A_ij·‖f_h(x_j)‖
        (Kobayashi et al. 2020; needs ``norms=True``), as they are: not normalised
        (``rollout(attn, weights="norms")`` first divides each row by its sum).

        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
        >>> model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
        >>> from attnscope import capture
        >>> with torch.no_grad(), capture(model, norms=True) as attn:
        ...     _ = model(torch.randn(1, 3, 8))
        >>> attn.weighted("norms").names, attn.weighted("norms")["layers.0.self_attn"].shape
        (['layers.0.self_attn'], torch.Size([1, 2, 3, 3]))
        """
        if by not in ("grads", "norms"):
            raise AttnScopeError(f"weighted(by=...) takes 'grads' or 'norms', got {by!r}")
        calls: dict[str, list[Tensor]] = {}
        for name in self.names:
            calls[name] = []
            for index, weights in enumerate(self._calls[name]):
                if by == "norms":
                    calls[name].append(self.norms(name, call=index))
                else:
                    grad = self._pick(name, self._grads.get(name, []) or _no_grads(name), index)
                    product = grad.grad().to(_resolve(weights).dtype) * _resolve(weights)
                    calls[name].append(product.clamp(min=0))
        return self._derive(self.names, calls)

    def _index(self, name: str, call: int | None) -> int:
        count = len(self._calls[name])
        if call is None:
            if count > 1:
                raise AttnScopeError(
                    f"{name!r} was called {count} times in this capture; pass call=i "
                    f"(0..{count - 1}, or -1 for the last)"
                )
            return 0
        if not -count <= call < count:
            raise AttnScopeError(f"{name!r} was called {count} times; call={call} is out")
        return call % count

    def _pick(self, name: str, slots: list[GradSlot], call: int | None) -> GradSlot:
        return slots[self._index(name, call)]

    def queries_keys(self, name: str, call: int = -1) -> tuple[Tensor, Tensor]:
        """A lazy capture's per-head queries, already multiplied by the kernel's scale, and
        keys for ``name`` (its ``call``-th call, the last by default): (batch, heads, query,
        dim) and (batch, heads, key, dim), heads expanded for grouped-query attention, so
        ``q @ k.transpose(-1, -2)`` are the scores before the mask and ``q[..., i, :] *
        k[..., j, :]`` are the terms of query ``i``'s score for key ``j`` (bertviz's neuron
        view).

        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
        >>> model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
        >>> from attnscope import capture
        >>> with torch.no_grad(), capture(model, lazy=True) as attn:
        ...     _ = model(torch.randn(1, 3, 8))
        >>> q, k = attn.queries_keys("layers.0.self_attn")
        >>> scores = q @ k.transpose(-1, -2)
        >>> torch.allclose(scores.softmax(-1), attn["layers.0.self_attn"], atol=1e-6)
        True
        """
        self._check_name(name)
        calls = self._calls[name]
        if not -len(calls) <= call < len(calls):
            raise AttnScopeError(f"{name!r} was called {len(calls)} times; call={call} is out")
        weights = calls[call]
        if not isinstance(weights, LazyWeights):
            raise AttnScopeError(
                f"{name!r} holds weights only: queries and keys are kept by lazy captures, "
                "capture(model, lazy=True)"
            )
        return weights.terms()

    def rows(self, name: str) -> list[int] | None:
        """The query positions captured (``capture(rows=...)``), or None for all of them."""
        self._check_name(name)
        return self._rows.get(name)

    @property
    def lazy(self) -> bool:
        """Whether weights are computed on access (``capture(lazy=True)``)."""
        return any(isinstance(w, LazyWeights) for ws in self._calls.values() for w in ws)

    def kind(self, name: str) -> str:
        """``"self"``, ``"causal"`` or ``"cross"``."""
        self._check_name(name)
        return self._kinds[name]

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, weights)`` pairs, for single-call modules."""
        for name in self.names:
            yield name, self[name]

    def incremental(self, name: str) -> bool:
        """Whether the calls of ``name`` are the steps of incremental decoding (``concat``).

        A module called once is. Otherwise each call's key count must be the previous call's
        key count plus its own query count, as with a KV cache (the new queries see the cached
        keys and themselves); a cross-attention module may instead see the same keys at every
        call (the encoder's), as long as its query counts do not grow at every call. A loop
        that re-runs the whole prefix at each step (no cache) is not incremental, nor are
        calls on separate inputs of other lengths.

        >>> step = [torch.ones(1, 1, 2, 2) / 2, torch.ones(1, 1, 1, 3) / 3]
        >>> rerun = [torch.ones(1, 1, 2, 2) / 2, torch.ones(1, 1, 3, 3) / 3]
        >>> maps = AttentionMaps.from_tensors({"cached": step, "rerun": rerun}, kinds="causal")
        >>> maps.incremental("cached"), maps.incremental("rerun")
        (True, False)
        """
        self._check_name(name)
        return self._not_incremental(name) is None

    def _not_incremental(self, name: str) -> str | None:
        """Why the calls of ``name`` are not incremental decoding, or None when they are."""
        shapes = [tuple(w.shape) for w in self._calls[name]]
        steps = list(itertools.pairwise(shapes))
        cached = all(after[3] == before[3] + after[2] for before, after in steps)
        if self._kinds[name] == "cross" and not cached:
            # the same keys (the encoder's) at every call; a cached nn.MultiheadAttention,
            # "cross" because its query is not its key, passed as cached already
            for index, shape in enumerate(shapes):
                if shape[3] != shapes[0][3]:
                    return f"call {index} has {shape[3]} keys, call 0 {shapes[0][3]}"
            if steps and all(after[2] > before[2] for before, after in steps):
                return (
                    "every call has more queries than the one before "
                    f"({', '.join(str(s[2]) for s in shapes)}): each re-ran the queries so far"
                )
            return None
        for index, (before, after) in enumerate(steps, start=1):
            if after[3] != before[3] + after[2]:
                return (
                    f"call {index} has {after[3]} keys, not {before[3]} + {after[2]} (the "
                    "previous call's keys plus its own queries, as with a KV cache): it re-ran "
                    "the sequence so far, or another input"
                )
        return None

    def display(self, name: str, *, warn: bool = True) -> Displayed:
        """What views and figures show for ``name``: ``(weights, note)``.

        One call: that call (note ""). Incremental calls: ``concat(name)``. Other repeated
        calls (a loop re-running the whole prefix at every step, a module called on several
        inputs): the last call, ``calls(name)[-1]``, and a warning unless ``warn=False``; the
        note says which it is, for a figure's title.

        >>> calls = [torch.ones(1, 1, 1, 1), torch.ones(1, 1, 2, 2) / 2]
        >>> maps = AttentionMaps.from_tensors({"dec": calls}, kinds="causal")
        >>> weights, note = maps.display("dec", warn=False)
        >>> tuple(weights.shape), note
        ((1, 1, 2, 2), 'last of 2 calls')
        """
        self._check_name(name)
        calls = self._calls[name]
        if len(calls) == 1:
            return Displayed(_resolve(calls[0]), "")
        why = self._not_incremental(name)
        if why is None:
            return Displayed(self.concat(name), f"{len(calls)} incremental calls joined")
        if warn:
            warnings.warn(
                f"{name!r} was called {len(calls)} times and the calls are not incremental "
                f"decoding ({why}); showing the last call, attn.calls({name!r})[-1]",
                UserWarning,
                stacklevel=2,
            )
        return Displayed(_resolve(calls[-1]), f"last of {len(calls)} calls")

    def concat(self, name: str) -> Tensor:
        """Join the calls of incremental decoding into (batch, heads, all queries, all keys).

        Call ``i`` fills its queries' rows and its first keys; keys that did not exist yet are 0.
        Calls that are not incremental (see ``incremental``), such as a greedy loop that re-runs
        the whole prefix at every step, are refused: their last call is the whole sequence.

        >>> first = torch.ones(1, 1, 2, 2) / 2
        >>> step = torch.ones(1, 1, 1, 3) / 3
        >>> AttentionMaps.from_tensors({"a": [first, step]}).concat("a")[0, 0]
        tensor([[0.5000, 0.5000, 0.0000],
                [0.5000, 0.5000, 0.0000],
                [0.3333, 0.3333, 0.3333]])
        """
        self._check_name(name)
        why = self._not_incremental(name)
        if why is not None:
            raise AttnScopeError(
                f"the {len(self._calls[name])} calls of {name!r} are not incremental decoding: "
                f"{why}. Use attn.calls({name!r})[-1] for the last call (the whole sequence, "
                f"when each call re-ran the prefix), or attn.calls({name!r}) for each call"
            )
        calls = self.calls(name)
        batch, heads = calls[0].shape[:2]
        for weights in calls:
            if tuple(weights.shape[:2]) != (batch, heads):
                raise AttnScopeError(
                    f"calls of {name!r} differ in batch or heads ({tuple(weights.shape[:2])} vs "
                    f"{(batch, heads)}); concat joins incremental steps of one sequence batch"
                )
        queries = sum(w.size(2) for w in calls)
        keys = max(w.size(3) for w in calls)
        out = calls[0].new_zeros(batch, heads, queries, keys)
        row = 0
        for weights in calls:
            out[:, :, row : row + weights.size(2), : weights.size(3)] = weights
            row += weights.size(2)
        return out

    def select(
        self,
        kind: str | None = None,
        include: NamesFilter | None = None,
        exclude: NamesFilter | None = None,
    ) -> AttentionMaps:
        """A smaller ``AttentionMaps`` with the names of one kind and/or matching globs."""
        names = self.names
        if kind is not None:
            if kind not in KINDS:
                raise AttnScopeError(f"kind must be one of {KINDS}, got {kind!r}")
            names = [n for n in names if self._kinds[n] == kind]
            if not names:
                present = sorted(set(self._kinds.values()))
                raise AttnScopeError(f"no {kind!r} attention here; kinds present: {present}")
        names = filter_names(names, include, exclude)
        return self._derive(names)

    def stack(self) -> Tensor:
        """(layers, batch, heads, query, key) of every name, when their shapes agree."""
        if not self._calls:
            raise AttnScopeError("nothing to stack: this AttentionMaps is empty")
        tensors = [self[name] for name in self.names]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            detail = ", ".join(
                f"{n}: {tuple(t.shape)}" for n, t in zip(self.names, tensors, strict=True)
            )
            raise AttnScopeError(
                f"cannot stack maps of different shapes ({detail}); narrow them first, "
                "e.g. attn.select(kind='self').stack()"
            )
        return torch.stack(tensors)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> AttentionMaps:
        """A copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        calls: dict[str, list[Tensor]] = {
            n: [_resolve(w).to(device=device, dtype=dtype) for w in ws]
            for n, ws in self._calls.items()
        }
        return self._derive(self.names, calls)

    @property
    def nbytes(self) -> int:
        """Bytes held: the weights, or for a lazy capture the tensors kept to compute them
        (a tensor several calls keep, such as a mask, counted once)."""
        held: set[tuple[int, int, int]] = set()
        total = 0
        for ws in self._calls.values():
            for w in ws:
                if isinstance(w, LazyWeights):
                    held.update(w.held_ranges())
                else:
                    total += w.numel() * w.element_size()
        return total + union_bytes(held)

    # -- token labels -----------------------------------------------------------------------

    @property
    def tokens(self) -> Tokens | None:
        """Labels of the input (encoder's or only) sequence, or None."""
        return self._tokens

    @property
    def target_tokens(self) -> Tokens | None:
        """Labels of the decoder's sequence in an encoder-decoder model, or None."""
        return self._target_tokens

    def with_tokens(
        self, tokens: Tokens | None, target_tokens: Tokens | None = None
    ) -> AttentionMaps:
        """A labelled copy; see ``labels`` for which labels each kind uses."""
        maps = self._derive(self.names)
        maps._tokens = _check_tokens(tokens, "tokens")
        maps._target_tokens = _check_tokens(target_tokens, "target_tokens")
        for name in maps.names:
            shape = maps._shape(name)
            query_labels, key_labels = maps._labels_for(name)
            for axis, labels, size in (
                ("query", query_labels, shape[2]),
                ("key", key_labels, shape[3]),
            ):
                if labels is None or (axis == "query" and maps._rows.get(name) is not None):
                    continue  # rows= kept some query positions: labels cover the whole sequence
                for item in range(shape[0]):
                    got = len(_item(labels, item))
                    if got not in (size, _unextended(maps, name, axis, size)):
                        raise AttnScopeError(
                            f"{name!r} ({maps._kinds[name]}) has {size} {axis} positions but "
                            f"its labels have {got} (batch item {item}); give one label per "
                            "position, the padding included"
                        )
        return maps

    def with_tokenizer(
        self, tokenizer: Any, input_ids: Any, target_ids: Any | None = None
    ) -> AttentionMaps:
        """Label with a tokenizer's tokens: ``attn.with_tokenizer(tok, enc["input_ids"])``.

        ``input_ids`` label the input (encoder) sequence, ``target_ids`` the decoder's; each is
        a (batch, length) tensor or nested list of ids. Special and padding tokens are kept, so
        labels line up with positions.
        """
        return self.with_tokens(
            _ids_to_tokens(tokenizer, input_ids),
            None if target_ids is None else _ids_to_tokens(tokenizer, target_ids),
        )

    def merge_tokens(
        self,
        groups: Sequence[Sequence[int]] | None = None,
        target_groups: Sequence[Sequence[int]] | None = None,
        *,
        batch: int | None = None,
    ) -> AttentionMaps:
        """Word-level maps: sub-word tokens merged into words (Clark et al. 2019).

        Attention *to* a word is the sum of its tokens' columns; attention *from* a word is the
        mean of its tokens' rows, so rows still sum to 1. ``groups`` (positions of ``tokens``,
        one list per word) and ``target_groups`` (of ``target_tokens``) default to the words
        read from the labels' ``##`` / ``Ġ`` / ``▁`` markers; special tokens stay single.
        Each module's ``display`` weights are merged; ``batch`` merges one batch item.

        >>> w = torch.tensor([[[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]])
        >>> maps = AttentionMaps.from_tensors({"l": w}).with_tokens(["[CLS]", "play", "##ing"])
        >>> words = maps.merge_tokens()
        >>> words.tokens, words["l"][0, 0].tolist()
        (['[CLS]', 'playing'], [[0.5, 0.5], [0.5, 0.5]])
        """
        from .words import merge_maps

        return merge_maps(self, groups, target_groups, batch=batch)  # type: ignore[arg-type]

    def labels(self, name: str, batch: int = 0) -> tuple[list[str] | None, list[str] | None]:
        """(query labels, key labels) of ``name`` for one batch item.

        Self maps use ``tokens`` on both axes. Causal maps use ``target_tokens`` when given (the
        decoder of an encoder-decoder model), else ``tokens``. Cross maps use ``target_tokens``
        for queries and ``tokens`` for keys.
        """
        self._check_name(name)
        query_labels, key_labels = self._labels_for(name)
        queries = None if query_labels is None else list(_item(query_labels, batch))
        rows = self._rows.get(name)
        if queries is not None and rows is not None:
            queries = [queries[r] for r in rows]
        return queries, None if key_labels is None else list(_item(key_labels, batch))

    def _labels_for(self, name: str) -> tuple[Tokens | None, Tokens | None]:
        kind = self._kinds[name]
        if kind == "cross":
            return self._target_tokens, self._tokens
        if kind == "causal" and self._target_tokens is not None:
            return self._target_tokens, self._target_tokens
        return self._tokens, self._tokens

    def _shape(self, name: str) -> tuple[int, ...]:
        """The shape of what ``display`` shows for ``name``, computing nothing."""
        shapes = [tuple(w.shape) for w in self._calls[name]]
        if len(shapes) == 1:
            return shapes[0]
        if self._not_incremental(name) is not None:
            return shapes[-1]
        return (*shapes[0][:2], sum(x[2] for x in shapes), max(x[3] for x in shapes))

    # -- interop ----------------------------------------------------------------------------

    def to_bertviz(self, batch: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``bertviz.head_view`` / ``model_view`` (one batch item).

        Single-stack models give ``attention`` (a tuple of (1, heads, q, k) per layer) and
        ``tokens``; encoder-decoder models give ``encoder_attention``, ``decoder_attention``,
        ``cross_attention``, ``encoder_tokens`` and ``decoder_tokens``. Use it as
        ``head_view(**attn.to_bertviz())``.
        """

        def layers(names: list[str]) -> tuple[Tensor, ...]:
            return tuple(self.display(n).weights[batch : batch + 1] for n in names)

        cross = [n for n in self.names if self._kinds[n] == "cross"]
        if not cross:
            tokens = self.labels(self.names[0], batch)[0]
            return {"attention": layers(self.names), "tokens": tokens}
        encoder = [n for n in self.names if self._kinds[n] == "self"]
        decoder = [n for n in self.names if self._kinds[n] == "causal"]
        result: dict[str, Any] = {
            "encoder_attention": layers(encoder),
            "decoder_attention": layers(decoder),
            "cross_attention": layers(cross),
        }
        query_labels, key_labels = self.labels(cross[0], batch)
        result["encoder_tokens"] = key_labels
        result["decoder_tokens"] = query_labels
        return result

    def to_circuitsvis(self, name: str | None = None, batch: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``circuitsvis.attention.attention_patterns``/``attention_heads``:
        ``tokens`` and ``attention`` as (heads, query, key), of ``name`` (default: the first
        module)."""
        if name is None:
            if not self._calls:
                raise AttnScopeError("nothing to export: this AttentionMaps is empty")
            name = self.names[0]
        weights = self.display(name).weights[batch]
        query_labels, key_labels = self.labels(name, batch)
        tokens = key_labels or query_labels or [str(i) for i in range(weights.size(-1))]
        return {"tokens": tokens, "attention": weights}

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file with names, kinds, calls and labels as metadata (atomic)."""
        tensors: dict[str, Tensor] = {}
        calls: dict[str, list[str]] = {}
        for index, name in enumerate(self.names):
            keys = [f"{index}.{call}" for call in range(len(self._calls[name]))]
            calls[name] = keys
            tensors.update(zip(keys, self.calls(name), strict=True))
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "attnscope_version": __version__,
            "names": self.names,
            "kinds": self._kinds,
            "calls": calls,
            "tokens": self._tokens,
            "target_tokens": self._target_tokens,
            "rows": {n: r for n, r in self._rows.items() if r is not None},
        }
        return write_safetensors(path, tensors, {"attnscope": json.dumps(header)})

    def __repr__(self) -> str:
        if not self._calls:
            return "AttentionMaps(empty)"
        lines = [f"AttentionMaps({len(self)} modules, {self.nbytes / 2**20:.2f} MiB)"]
        for name in self.names[:12]:
            calls = self._calls[name]
            more = f" x{len(calls)} calls" if len(calls) > 1 else ""
            lines.append(f"  {name}: {self._kinds[name]} {tuple(calls[0].shape)}{more}")
        if len(self) > 12:
            lines.append(f"  ... {len(self) - 12} more")
        return "\n".join(lines)


def load(path: str | os.PathLike[str], *, memory_map: bool = False) -> AttentionMaps:
    """Read a capture written by ``AttentionMaps.save`` (or a ``spill=`` folder); never unpickles.

    A spill folder, and a file with ``memory_map=True``, are mapped, not read: weights stay on
    disk until used. Every field is checked against the others (names, kinds, calls, shapes,
    rows, labels): a damaged or foreign file raises ``AttnScopeError`` naming it.
    """
    source = Path(path)
    if source.is_dir():
        return _load_spill(source)
    tensors, metadata = read_safetensors(source, memory_map=memory_map)
    header = _capture_header(source, metadata)
    try:
        return _maps_from_header(header, tensors)
    except AttnScopeError as error:
        raise AttnScopeError(
            f"{source}: attnscope metadata is damaged ({error}); restore the file or save the "
            "capture again"
        ) from None


def _load_spill(folder: Path) -> AttentionMaps:
    if not (folder / "index.json").is_file():
        raise AttnScopeError(
            f"{folder} is a folder without index.json: not a spilled capture; give a spill "
            "folder or a .safetensors file"
        )
    maps = AttentionMaps()
    for name, kind, weights in read_spill(folder):
        try:
            _check_floating(name, weights)
            maps._append(name, kind, weights)
        except AttnScopeError as error:
            raise AttnScopeError(f"{folder}: a spilled call is damaged ({error})") from None
    return maps


def _capture_header(source: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The attnscope header of a safetensors file, its format and version checked."""
    if "attnscope" not in metadata:
        raise AttnScopeError(
            f"{source}: a safetensors file, but not an attnscope capture (no metadata)"
        )
    try:
        header = json.loads(metadata["attnscope"])
    except (ValueError, RecursionError) as error:
        raise AttnScopeError(f"{source}: attnscope metadata is not valid JSON ({error})") from None
    found = header.get("format") if isinstance(header, dict) else type(header).__name__
    if found != FORMAT:
        raise AttnScopeError(f"{source}: not an attnscope capture (format {found!r})")
    version = header.get("format_version")
    if not _is_index(version) or version < 1:
        raise AttnScopeError(f"{source}: attnscope metadata has no format_version number")
    if version > FORMAT_VERSION:
        raise AttnScopeError(
            f"{source}: written in capture format {version} by attnscope "
            f"{header.get('attnscope_version')}; this attnscope ({__version__}) reads format "
            f"{FORMAT_VERSION} — upgrade attnscope to read it"
        )
    return header


def _maps_from_header(header: dict[str, Any], tensors: Mapping[str, Tensor]) -> AttentionMaps:
    names = header.get("names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise AttnScopeError("names is not a list of strings")
    if len(set(names)) != len(names):
        raise AttnScopeError("names repeat")
    kinds, calls, rows = (_field(header, key) for key in ("kinds", "calls", "rows"))
    if set(rows) - set(names):
        raise AttnScopeError(f"rows name modules not in names: {sorted(set(rows) - set(names))}")
    maps = AttentionMaps()
    for name in names:
        keys, name_rows = calls.get(name), rows.get(name)
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            raise AttnScopeError(f"the calls of {name!r} are not a list of tensor names")
        if name_rows is not None and not (
            isinstance(name_rows, list)
            and name_rows
            and all(_is_index(r, signed=True) for r in name_rows)
        ):
            raise AttnScopeError(f"the rows of {name!r} are not a list of query positions")
        kind = kinds.get(name)
        if not isinstance(kind, str):
            raise AttnScopeError(f"{name!r} has no kind")
        for key in keys:
            if key not in tensors:
                raise AttnScopeError(f"{name!r} has a call {key!r} that the file does not hold")
            _check_floating(key, tensors[key])
            maps._append(name, kind, tensors[key], rows=name_rows)
            if name_rows is not None and tensors[key].size(2) != len(name_rows):
                raise AttnScopeError(
                    f"{name!r} has {len(name_rows)} rows but {tensors[key].size(2)} queries"
                )
    labelled = maps.with_tokens(header.get("tokens"), header.get("target_tokens"))
    _check_rows_in_range(labelled)
    return labelled


def _field(header: dict[str, Any], key: str) -> dict[str, Any]:
    value = header.get(key) or {}
    if not isinstance(value, dict):
        raise AttnScopeError(f"{key} is not a JSON object")
    return value


def _is_index(value: object, signed: bool = False) -> TypeGuard[int]:
    # bool is an int in Python, but ``true`` where a number belongs is damage
    return isinstance(value, int) and not isinstance(value, bool) and (signed or value >= 0)


def _check_floating(key: str, weights: Tensor) -> None:
    if not weights.is_floating_point():
        raise AttnScopeError(f"{key!r} holds {weights.dtype}, not attention weights (floats)")


def _check_rows_in_range(maps: AttentionMaps) -> None:
    """Rows index the whole query sequence: its labels when there are labels, else (self and
    causal maps, whose keys are that sequence) the keys; ``labels()`` relies on it."""
    for name in maps.names:
        rows = maps._rows.get(name)
        if rows is None:
            continue
        query_labels = maps._labels_for(name)[0]
        if query_labels is not None:
            per_item = (
                query_labels
                if query_labels and isinstance(query_labels[0], list)
                else [query_labels]
            )
            lengths = {len(labels) for labels in per_item}
        elif maps._kinds[name] != "cross":
            lengths = {maps._shape(name)[3]}
        else:
            continue  # a cross map's queries are the target sequence: nothing here bounds them
        for length in lengths:
            outside = [r for r in rows if not -length <= r < length]
            if outside:
                raise AttnScopeError(
                    f"rows {outside[:5]} of {name!r} lie outside its {length} query positions"
                )


def _check_tokens(tokens: Tokens | None, what: str) -> Tokens | None:
    if tokens is None:
        return None
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise AttnScopeError(
            f"{what} must be a list of str (or one list per batch item), "
            f"got {type(tokens).__name__}"
        )
    if all(isinstance(t, str) for t in tokens):
        return [str(t) for t in tokens]
    if all(
        isinstance(t, Sequence) and not isinstance(t, str) and all(isinstance(s, str) for s in t)
        for t in tokens
    ):
        return [[str(s) for s in t] for t in tokens]
    raise AttnScopeError(f"{what} must be a list of str or a list of lists of str")


def _no_grads(name: str) -> list[GradSlot]:
    raise AttnScopeError(
        f"no gradients were kept for {name!r}: capture with attnscope.capture(model, "
        "grads=True) and call loss.backward() inside the block"
    )


def _resolve(weights: Tensor | LazyWeights) -> Tensor:
    return weights.materialize() if isinstance(weights, LazyWeights) else weights


def _ids_to_tokens(tokenizer: Any, ids: Any) -> list[list[str]]:
    rows = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if rows and not isinstance(rows[0], list):
        rows = [rows]
    return [[str(t) for t in tokenizer.convert_ids_to_tokens(row)] for row in rows]


def _item(labels: Tokens, batch: int) -> list[str]:
    if labels and isinstance(labels[0], list):
        per_item: list[list[str]] = labels
        if batch >= len(per_item):
            raise AttnScopeError(f"labels cover {len(per_item)} batch items, not item {batch}")
        return per_item[batch]
    return labels  # type: ignore[return-value]


def _unextended(maps: AttentionMaps, name: str, axis: str, size: int) -> int:
    """Key positions without the extra keys ``add_bias_kv``/``add_zero_attn`` append."""
    if axis != "key" or maps._kinds[name] == "cross":
        return size
    query_size = maps._shape(name)[2]
    return query_size if 0 < size - query_size <= 2 else size
