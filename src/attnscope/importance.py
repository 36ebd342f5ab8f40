"""``attnscope.head_importance``: how much the loss depends on each head (Michel et al. 2019,
"Are Sixteen Heads Really Better than One?").

For a head mask ξ multiplying each head's output before the output projection (ξ = 1: the
model unchanged), the importance of head h is Σ over batches of |∂L/∂ξ_h|. ξ is applied inside
the model's own attention calls (``attnscope.edits``), so any model attnscope captures is
supported, with its fused kernels; the model's parameters and their ``.grad`` are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import edits
from .errors import AttnScopeError
from .head_stats import RowTable
from .interventions import _activate, attention_modules

COLUMNS = ("module", "head", "importance")


class ImportanceTable(RowTable):
    """One row per (module, head): ``module``, ``head``, ``importance``; iterate for dicts,
    ``matrix()`` for (modules, heads), ``to_csv()`` for a file, print to read."""

    columns = COLUMNS

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(str(row["module"]) for row in self.rows))

    def matrix(self) -> Tensor:
        """(modules, heads) importances, modules in call order; NaN where a module has fewer
        heads than the widest."""
        modules = self.modules
        width = 1 + max(int(str(row["head"])) for row in self.rows)
        grid = torch.full((len(modules), width), float("nan"), dtype=torch.float64)
        for row in self.rows:
            grid[modules.index(str(row["module"])), int(str(row["head"]))] = float(
                str(row["importance"])
            )
        return grid

    def __str__(self) -> str:
        width = max([len("module")] + [len(str(r["module"])) for r in self.rows])
        lines = [f"{'module':<{width}}  head  importance"]
        lines += [
            f"{r['module']!s:<{width}}  {r['head']:>4}  {r['importance']:10.4g}" for r in self.rows
        ]
        return "\n".join(lines)

    __repr__ = __str__


def head_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[Any, Any], Tensor],
) -> ImportanceTable:
    """Σ over ``batches`` of |∂L/∂ξ_h| for every attention head of ``model``: each batch is
    run as ``model(**batch)`` (a mapping), ``model(*batch)`` (a tuple) or ``model(batch)``, and
    ``loss(outputs, batch)`` gives the scalar L.

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    >>> table = head_importance(model, [torch.randn(2, 4, 8)], lambda out, x: out.sum())
    >>> [(row["module"], row["head"]) for row in table]
    [('layers.0.self_attn', 0), ('layers.0.self_attn', 1)]
    """
    if not isinstance(model, nn.Module):
        raise AttnScopeError(
            f"head_importance() takes a torch.nn.Module, got {type(model).__name__}"
        )
    if not callable(loss):
        raise AttnScopeError(
            "head_importance(model, batches, loss): loss(outputs, batch) -> scalar"
        )
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise AttnScopeError(
            f"head_importance(model, batches, loss): batches must be an iterable of batches "
            f"(e.g. a list of dicts or a DataLoader), got {type(batches).__name__}"
        )
    modules = attention_modules(model)
    if not modules:
        raise AttnScopeError(f"found no attention module in {type(model).__name__}")
    totals: dict[str, Tensor] = {}
    seen = 0
    for batch in batches:
        seen += 1
        for name, magnitude in _one_batch(model, modules, batch, loss).items():
            totals[name] = magnitude if name not in totals else totals[name] + magnitude
    if not seen:
        raise AttnScopeError("head_importance() got no batches")
    order = [name for name in modules if name in totals]  # the model's order
    rows: list[dict[str, object]] = [
        {"module": name, "head": head, "importance": float(value)}
        for name in order
        for head, value in enumerate(totals[name].tolist())
    ]
    return ImportanceTable(rows)


def _one_batch(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batch: Any,
    loss: Callable[[Any, Any], Tensor],
) -> dict[str, Tensor]:
    """|∂L/∂ξ_h| of one batch, per module that ran: ξ made at each module's first call."""
    names = {id(m): n for n, m in modules.items()}
    masks: dict[str, Tensor] = {}

    def scales(module: nn.Module, heads: int, output: Tensor) -> Tensor:
        name = names[id(module)]
        if name not in masks:
            masks[name] = torch.ones(
                heads, dtype=output.dtype, device=output.device, requires_grad=True
            )
        return masks[name]

    chosen = edits.EditSet(
        {m: edits.Edit(n, heads=edits.scale_heads(scales)) for n, m in modules.items()}
    )
    with torch.enable_grad(), contextlib.ExitStack() as stack:
        check = _activate(chosen, modules, stack)
        value = loss(_run(model, batch), batch)
        check()
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        )
        raise AttnScopeError(f"loss(outputs, batch) must give a scalar tensor, got {got}")
    if not masks:
        raise AttnScopeError("no attention head ran in the batch: nothing to weigh")
    if not value.requires_grad:
        raise AttnScopeError("the loss does not depend on the model's attention heads")
    wanted = list(masks)
    grads = torch.autograd.grad(value, [masks[n] for n in wanted], allow_unused=True)
    return {
        name: torch.zeros_like(masks[name]) if grad is None else grad.detach().abs()
        for name, grad in zip(wanted, grads, strict=True)
    }


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)
