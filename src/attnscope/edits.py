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
The edit belongs to the innermost calling module that has one. PyTorch's
``nn.MultiheadAttention`` reaches sdpa only on its Python path: while an edit of one is
active, PyTorch's fused MHA and encoder fast paths are switched off (reference counted,
restored on exit), and the capture's recompute of its weights reads the same knockout.
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


class EditSet:
    """The edits one ``ablate``/``knockout``/``head_importance`` makes, by module."""

    def __init__(self, edits: dict[nn.Module, Edit]) -> None:
        self.thread = threading.get_ident()
        self.by_module = {id(module): (module, edit) for module, edit in edits.items()}

    def edit_of(self, callers: Iterable[nn.Module]) -> tuple[nn.Module, Edit] | None:
        """The edit of the innermost calling module that has one."""
        for module in callers:
            found = self.by_module.get(id(module))
            if found is not None:
                return found
        return None


_active: list[EditSet] = []
_lock = threading.Lock()
_fast_path_off = 0
_fast_path_before = True


def active_on_this_thread() -> list[EditSet]:
    if not _active:
        return []
    thread = threading.get_ident()
    return [edits for edits in tuple(_active) if edits.thread == thread]


def activate(edits: EditSet, stops_fast_path: bool) -> Callable[[], None]:
    """Make ``edits`` active; the returned callable undoes it (idempotent)."""
    global _fast_path_off, _fast_path_before
    with _lock:
        if stops_fast_path:
            if _fast_path_off == 0:
                _fast_path_before = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            _fast_path_off += 1
        _active.append(edits)
    done = False

    def undo() -> None:
        global _fast_path_off
        nonlocal done
        with _lock:
            if done:
                return
            done = True
            if edits in _active:
                _active.remove(edits)
            if stops_fast_path:
                _fast_path_off -= 1
                if _fast_path_off == 0:
                    torch.backends.mha.set_fastpath_enabled(_fast_path_before)

    return undo


def edges_of(module: nn.Module) -> list[tuple[int, int]]:
    """The edges knocked out of ``module`` on this thread now (for the capture's recompute)."""
    edges: list[tuple[int, int]] = []
    for edits in active_on_this_thread():
        found = edits.by_module.get(id(module))
        if found is not None:
            edges.extend(found[1].edges)
    return edges


def edge_mask(
    name: str, edges: Sequence[tuple[int, int]], queries: int, keys: int, device: torch.device
) -> Tensor:
    """(query, key) bool, True at the knocked-out edges; positions checked against this call.

    >>> edge_mask("m", [(1, 0)], 2, 3, torch.device("cpu"))
    tensor([[False, False, False],
            [ True, False, False]])
    """
    hidden = torch.zeros(queries, keys, dtype=torch.bool, device=device)
    for query, key in edges:
        if not (0 <= query < queries and 0 <= key < keys):
            raise AttnScopeError(
                f"knockout: edge ({query}, {key}) of {name!r} is outside this call's "
                f"{queries} queries x {keys} keys (positions from 0)"
            )
        hidden[query, key] = True
    whole = hidden.all(dim=-1).nonzero().flatten().tolist()
    if whole:
        raise AttnScopeError(
            f"knockout: {name!r} query {whole[0]} would see no key at all (every edge of its "
            "row knocked out): its output would be undefined; keep at least one key per query"
        )
    return hidden


def knock_out(
    name: str,
    edges: Sequence[tuple[int, int]],
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    is_causal: bool,
) -> Tensor:
    """sdpa's ``attn_mask`` with the edges hidden (bool: False; float: ``-inf``), for a call
    with ``query`` (..., L, E) and ``key`` (..., S, E); ``is_causal`` becomes part of it."""
    queries, keys = query.size(-2), key.size(-2)
    hidden = edge_mask(name, edges, queries, keys, query.device)
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
