"""Edits inside a model's own attention calls: the mechanism under ``ablate``, ``knockout`` and
``head_importance``.

Design note
-----------
Two edits, each made where the model's attention kernel runs, so the model's own code, masks
and kernels do the rest:

- a *head edit* rewrites the kernel's per-head output ``O`` (batch, heads, query, dim), the
  context each head hands to the output projection: zero it, replace it by its mean over the
  batch's real tokens, or scale it by a head mask ξ (Michel et al. 2019);
- a *knockout* hides (query, key) edges from the kernel: their scores become ``-inf`` in the
  mask it is given (Geva et al. 2023), a bool mask and a float one alike, ``is_causal``
  turned into the same causal mask with the edges added.

Every call of ``scaled_dot_product_attention`` is already intercepted for capture
(``adapters.sdpa``); while an ``EditSet`` is active on a thread, each call made there is given
to it, with the modules on the stack, before the kernel (the mask) and after it (the output).
The edits belong to the innermost calling module that has any; every active set's edits of
it apply (knocked-out edges united, head edits in the order the sets were entered). A call
with fewer queries than keys (a KV-cache step) has its queries at the last positions: an
edge names absolute positions, and only those of the call's queries apply to it.

PyTorch's ``nn.MultiheadAttention`` reaches sdpa only on its Python path (and only with
``need_weights=False``): while one of its modules is edited, the entering thread runs under a
no-op ``TorchFunctionMode``, which PyTorch's fused MHA, encoder-layer and nested-tensor paths
all step aside for (their ``has_torch_function`` check); other threads keep their fast paths.
The capture's recompute of those weights reads the same knockout. A module that runs while
its edit could not be applied (an eager implementation that calls no sdpa, MHA asked for its
weights) makes the block raise on exit, instead of an unedited result passing for an edited
one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import AttnScopeError
from .recompute import causal_hidden

HeadEdit = Callable[[nn.Module, Tensor], Tensor]
"""(module, the kernel's output (batch, heads, query, dim)) -> the output the model gets."""


@dataclass
class Edit:
    """What one attention module's calls get: a head edit, knocked-out edges, or both."""

    name: str
    heads: HeadEdit | None = None
    edges: list[tuple[int, int]] = field(default_factory=list)
    matched: set[tuple[int, int]] = field(default_factory=set)  # edges some call had a row of


class EditSet:
    """The edits one ``ablate``/``knockout``/``head_importance`` makes, by module."""

    def __init__(self, edits: dict[nn.Module, Edit]) -> None:
        self.thread = threading.get_ident()
        self.by_module = {id(module): (module, edit) for module, edit in edits.items()}
        self.applied: dict[int, int] = {}  # id(module) -> calls edited

    def edit_of(self, module: nn.Module) -> Edit | None:
        found = self.by_module.get(id(module))
        return None if found is None else found[1]


def edits_of(
    sets: Sequence[EditSet], callers: Iterable[nn.Module]
) -> tuple[nn.Module, list[Edit]] | None:
    """The innermost calling module with an edit in any of ``sets``, and all its edits."""
    for module in callers:
        found = [edit for s in sets if (edit := s.edit_of(module)) is not None]
        if found:
            for edit_set in sets:
                if edit_set.edit_of(module) is not None:
                    edit_set.applied[id(module)] = edit_set.applied.get(id(module), 0) + 1
            return module, found
    return None


class _SlowPaths(torch.overrides.TorchFunctionMode):
    """Changes nothing; its presence makes PyTorch's fused MHA paths step aside."""

    def __torch_function__(
        self,
        func: Callable[..., object],
        types: object,
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        return func(*args, **(kwargs or {}))


_active: list[EditSet] = []
_lock = threading.Lock()


def active_on_this_thread() -> list[EditSet]:
    if not _active:
        return []
    thread = threading.get_ident()
    return [edits for edits in tuple(_active) if edits.thread == thread]


def activate(edits: EditSet, slow_paths: bool) -> Callable[[], None]:
    """Make ``edits`` active on this thread; the returned callable undoes it (idempotent)."""
    mode = _SlowPaths() if slow_paths else None
    with _lock:
        _active.append(edits)
    if mode is not None:
        mode.__enter__()
    done = False

    def undo() -> None:
        nonlocal done
        if done:
            return
        done = True
        if mode is not None:
            mode.__exit__(None, None, None)
        with _lock:
            if edits in _active:
                _active.remove(edits)

    return undo


def edges_of(module: nn.Module) -> list[tuple[int, int]]:
    """The edges knocked out of ``module`` on this thread now (for the capture's recompute)."""
    edges: list[tuple[int, int]] = []
    for edits in active_on_this_thread():
        edit = edits.edit_of(module)
        if edit is not None:
            edges.extend(edit.edges)
    return edges


def edge_mask(
    name: str,
    edges: Sequence[tuple[int, int]],
    queries: int,
    keys: int,
    device: torch.device,
    positions: Sequence[int] | None = None,
    matched: set[tuple[int, int]] | None = None,
) -> Tensor:
    """(query, key) bool, True at the knocked-out edges of a call whose query rows are at
    ``positions`` (default: the last ``queries`` of ``keys``, which for a square call is all
    of them); edges of other queries do not apply to it (a prefill is shorter than the
    positions a generation reaches), and are added to ``matched`` when they do. A key beyond
    the call's keys, for a query it has, raises.

    >>> edge_mask("m", [(1, 0)], 2, 3, torch.device("cpu"))  # rows at positions 1 and 2
    tensor([[ True, False, False],
            [False, False, False]])
    """
    if positions is None:
        start = keys - queries if queries <= keys else 0
        positions = list(range(start, start + queries))
    hidden = torch.zeros(queries, keys, dtype=torch.bool, device=device)
    rows: dict[int, list[int]] = {}
    for row, position in enumerate(positions):
        rows.setdefault(position, []).append(row)
    for query, key in edges:
        if query not in rows:
            continue
        if not 0 <= key < keys:
            raise AttnScopeError(
                f"knockout: edge ({query}, {key}) of {name!r} names key {key}, outside this "
                f"call's {keys} keys (positions from 0)"
            )
        if matched is not None:
            matched.add((query, key))
        for row in rows[query]:
            hidden[row, key] = True
    whole = hidden.all(dim=-1).nonzero().flatten().tolist()
    if whole:
        raise AttnScopeError(
            f"knockout: {name!r} query {positions[whole[0]]} would see no key at all (every "
            "edge of its row knocked out): its output would be undefined; keep at least one key"
        )
    return hidden


def knock_out(
    name: str,
    edges: Sequence[tuple[int, int]],
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    groups: int = 0,
    matched: set[tuple[int, int]] | None = None,
) -> Tensor:
    """sdpa's ``attn_mask`` with the edges hidden (bool: False; float: ``-inf``), for a call
    with ``query`` (..., L, E) and ``key`` (..., S, E); ``is_causal`` becomes part of it.
    ``groups``: the query axis packs that many heads of one query, the last position."""
    queries, keys = query.size(-2), key.size(-2)
    positions = [keys - 1] * queries if groups else None
    hidden = edge_mask(name, edges, queries, keys, query.device, positions, matched)
    if is_causal:
        hidden = hidden | causal_hidden(queries, keys, query.device)
    if mask is None:
        return ~hidden
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return mask.masked_fill(hidden, float("-inf"))


def zero_heads(heads: Sequence[int]) -> HeadEdit:
    """A head edit: those heads' outputs become zeros."""

    def edit(module: nn.Module, output: Tensor) -> Tensor:
        keep = torch.ones(output.size(1), dtype=output.dtype, device=output.device)
        keep[list(heads)] = 0
        return output * keep.view(1, -1, 1, 1)

    return edit


def mean_heads(heads: Sequence[int], valid: Callable[[], Tensor | None]) -> HeadEdit:
    """A head edit: those heads' outputs become their mean over the batch's real tokens
    (``valid()``: (batch, query) bool, or None for every position)."""

    def edit(module: nn.Module, output: Tensor) -> Tensor:
        chosen = list(heads)
        where = valid()
        picked = output[:, chosen]  # (batch, h, query, dim)
        if where is None or where.shape != (output.size(0), output.size(2)):
            mean = picked.mean(dim=(0, 2), keepdim=True)
        else:
            weight = where.to(output.dtype)[:, None, :, None]
            mean = (picked * weight).sum(dim=(0, 2), keepdim=True) / weight.sum().clamp_min(1)
        edited = output.clone()
        edited[:, chosen] = mean.expand_as(picked)
        return edited

    return edit


def scale_heads(scales: Callable[[nn.Module, int, Tensor], Tensor]) -> HeadEdit:
    """A head edit: each head's output times ``scales(module, heads, output)`` (heads,)."""

    def edit(module: nn.Module, output: Tensor) -> Tensor:
        xi = scales(module, output.size(1), output)
        return output * xi.to(output.dtype).view(1, -1, 1, 1)

    return edit
