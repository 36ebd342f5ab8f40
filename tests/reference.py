"""Independent references: PyTorch's own slow path, with no attnscope code involved.

``slow_path_weights`` runs a deep copy of the model in train mode with every dropout at 0 (so
neither fused kernel runs), and asks each ``nn.MultiheadAttention`` for
``need_weights=True, average_attn_weights=False`` through an ordinary forward pre-hook.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def slow_path_weights(model: nn.Module, run: Callable[[nn.Module], Any]) -> dict[str, list[Tensor]]:
    """Per-head weights of every MHA call of ``run(copy_of_model)``, as PyTorch computes them."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    reference.train()
    found: dict[str, list[Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            merged = dict(kwargs)
            merged.update(need_weights=True, average_attn_weights=False)
            with torch.no_grad():
                _, weights = nn.MultiheadAttention.forward(module, *args, **merged)
            if weights.dim() == 3:
                weights = weights.unsqueeze(0)
            found.setdefault(name, []).append(weights.detach().float())

        return pre_hook

    handles = [
        m.register_forward_pre_hook(hook(n), with_kwargs=True)
        for n, m in reference.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    ]
    try:
        run(reference)
    finally:
        for handle in handles:
            handle.remove()
    return found


def assert_weights_match(
    got: Tensor, expected: Tensor, valid_queries: Tensor | None = None, atol: float = 1e-5
) -> None:
    """``got`` equals ``expected`` on valid query rows; rows left NaN by the reference are 0.

    ``valid_queries`` is (batch, query) bool; invalid rows must be all zeros in ``got``.
    """
    assert got.shape == expected.shape, (got.shape, expected.shape)
    got = got.float()
    assert not torch.isnan(got).any(), "captured weights contain NaN"
    nan_rows = torch.isnan(expected).any(dim=-1)
    rows = ~nan_rows
    if valid_queries is not None:
        valid = valid_queries[:, None, :].expand(rows.shape)
        assert torch.all(got[~valid] == 0), "padded query rows must be zeros"
        rows = rows & valid
    assert torch.all(got[nan_rows] == 0), "fully masked rows must be zeros"
    diff = (got[rows] - expected[rows]).abs().max().item() if rows.any() else 0.0
    assert diff <= atol, f"max difference {diff:.3g} > {atol:g}"
