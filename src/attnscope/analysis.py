"""Measurements on attention weights: entropy, rollout, alignment.

Rollout follows Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020):
per layer, fuse the heads, add the identity for the residual stream, renormalise each row
(``(A + I) / rowsum``, rows are queries), and multiply the layers in order, later layers on
the left: ``R = Â_L ··· Â_1``. ``R[b, i, j]`` is how much of output token ``i`` comes from input
token ``j``. (Normalising columns instead, as some public code does, is a known bug.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import AttnScopeError
from .maps import AttentionMaps

HEAD_FUSIONS = ("mean", "max", "min")


def row_entropy(weights: Tensor) -> Tensor:
    """Entropy in nats of each attention row: (..., query, key) -> (..., query).

    >>> row_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    tensor([0.6931, 0.0000])
    """
    weights = weights.float()
    return torch.special.entr(weights).sum(dim=-1)


def valid_rows(weights: Tensor) -> Tensor:
    """Rows that carry attention (zero rows are padding or fully masked queries)."""
    return weights.float().sum(dim=-1) > 0.5


def mean_entropy(weights: Tensor) -> float:
    """Mean row entropy (nats) over all heads and valid query rows of a (batch, heads, q, k) map.

    >>> mean_entropy(torch.full((1, 2, 4, 4), 0.25))
    1.3862943649291992
    """
    rows = valid_rows(weights)
    if not bool(rows.any()):
        return float("nan")
    return float(row_entropy(weights)[rows].mean())


def fuse_heads(weights: Tensor, head_fusion: str) -> Tensor:
    """(batch, heads, q, k) -> (batch, q, k) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return weights.float().mean(dim=1)
    if head_fusion == "max":
        return weights.float().amax(dim=1)
    if head_fusion == "min":
        return weights.float().amin(dim=1)
    raise AttnScopeError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def layer_matrices(
    attn: AttentionMaps,
    kind: str,
    head_fusion: str,
    residual: bool = True,
    discard_ratio: float = 0.0,
) -> tuple[list[Tensor], Tensor]:
    """The per-layer matrices of rollout and flow, and the padded query rows (batch, n).

    Each is ``(A + I) / rowsum`` (or ``A / rowsum`` without the residual), with the heads
    fused and, optionally, the lowest ``discard_ratio`` of each row zeroed first.
    """
    if kind == "cross":
        raise AttnScopeError(
            "rollout and flow follow one stack's self-attention; use kind='self' or 'causal'"
        )
    if not 0.0 <= discard_ratio < 1.0:
        raise AttnScopeError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    maps = attn.select(kind=kind)
    layers: list[Tensor] = []
    padded: Tensor | None = None
    for name in maps.names:
        weights = maps.display(name).weights
        if weights.size(-1) != weights.size(-2):
            raise AttnScopeError(
                f"{name!r} is {weights.size(-2)} queries x {weights.size(-1)} keys; rollout needs "
                "square maps (the same tokens in and out)"
            )
        fused = fuse_heads(weights, head_fusion)
        if layers and fused.shape != layers[0].shape:
            raise AttnScopeError(
                f"{name!r} has shape {tuple(fused.shape)}, unlike the layers before it"
            )
        if padded is None:
            padded = fused.sum(dim=-1) == 0
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio)
        if residual:
            fused = fused + torch.eye(fused.size(-1))
        sums = fused.sum(dim=-1, keepdim=True)
        layers.append(torch.where(sums > 0, fused / sums.clamp_min(1e-30), fused))
    assert padded is not None
    return layers, padded


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` of each row's weights, never the first token's."""
    count = int(fused.size(-1) * ratio)
    if count == 0:
        return fused
    ranked = fused.clone()
    ranked[..., 0] = float("inf")
    lowest = ranked.topk(count, dim=-1, largest=False).indices
    return fused.scatter(-1, lowest, 0.0)


def rollout(
    attn: AttentionMaps,
    *,
    kind: str = "self",
    head_fusion: str = "mean",
    residual: bool = True,
    discard_ratio: float = 0.0,
    weights: str = "attention",
) -> Tensor:
    """Attention rollout: (batch, query, key) from the last layer's tokens to the input tokens.

    ``weights="norms"`` rolls out the norm-weighted maps of ``capture(model, norms=True)``
    instead (``attn.norms``), each row first divided by its sum (a row summing to 0 stays 0).

    >>> uniform = torch.full((1, 1, 2, 2), 0.5)
    >>> maps = AttentionMaps.from_tensors({"l0": uniform, "l1": uniform})
    >>> rollout(maps)[0]
    tensor([[0.6250, 0.3750],
            [0.3750, 0.6250]])
    """
    if weights == "norms":
        attn = norm_weighted(attn, kind)
    elif weights != "attention":
        raise AttnScopeError(f"weights= takes 'attention' or 'norms', got {weights!r}")
    layers, padded = layer_matrices(attn, kind, head_fusion, residual, discard_ratio)
    joint = layers[0]
    for matrix in layers[1:]:
        joint = matrix @ joint
    return joint.masked_fill(padded.unsqueeze(-1), 0.0)


def norm_weighted(attn: AttentionMaps, kind: str | None = None) -> AttentionMaps:
    """The norm-weighted maps ``attn.norms(name)`` of ``kind`` (all kinds if None), each row
    divided by its sum: where each query's output comes from, by size (rows summing to 0 stay
    0)."""
    names = attn.names if kind is None else attn.select(kind=kind).names
    calls: dict[str, list[Tensor]] = {}
    for name in names:
        calls[name] = []
        for index in range(len(attn.calls(name))):
            norms = attn.norms(name, call=index)
            sums = norms.sum(dim=-1, keepdim=True)
            calls[name].append(torch.where(sums > 0, norms / sums.clamp_min(1e-30), norms))
    return attn._derive(names, calls)


def grad_rollout(attn: AttentionMaps, *, kind: str = "self") -> Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021b, "Generic Attention-model
    Explainability"): ``R = I``, then, layer by layer in call order, ``R ← R + Ā·R`` with
    ``Ā = mean_h((∇A ⊙ A)⁺)``; (batch, query, key). Needs ``capture(model, grads=True)`` and a
    backward of the quantity to explain inside the block.

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    >>> from attnscope import capture
    >>> with capture(model, grads=True) as attn:
    ...     model(torch.randn(1, 4, 8))[0, 0].sum().backward()
    >>> grad_rollout(attn).shape
    torch.Size([1, 4, 4])
    """
    if kind == "cross":
        raise AttnScopeError(
            "grad_rollout follows one stack's self-attention: kind='self'/'causal'"
        )
    maps = attn.select(kind=kind)
    joint: Tensor | None = None
    for name in maps.names:
        weights, grad = attn[name], attn.grad(name)
        if weights.size(-1) != weights.size(-2):
            raise AttnScopeError(f"{name!r} is not square: grad_rollout needs the same tokens")
        relevance = (grad.to(weights.dtype) * weights).clamp(min=0).mean(dim=1)
        if joint is None:
            eye = torch.eye(weights.size(-1), dtype=weights.dtype, device=weights.device)
            joint = eye.expand_as(relevance).clone()
        if relevance.shape != joint.shape:
            raise AttnScopeError(f"{name!r} is {tuple(relevance.shape)}: layers differ in size")
        joint = joint + relevance @ joint
    assert joint is not None
    return joint


@dataclass(frozen=True)
class Alignment:
    """Hard alignment of a cross-attention map: the head-averaged argmax key of each query."""

    hard: Tensor  # (batch, query), -1 where the query is padding
    score: float | None  # share of (valid) queries aligned as expected, when given

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``hard, score = attnscope.alignment(...)``."""
        return iter((self.hard, self.score))


def alignment(attn: AttentionMaps, name: str, expected: Tensor | None = None) -> Alignment:
    """Hard alignment (argmax key per query, heads averaged) and, given ``expected`` ((query,)
    or (batch, query) key indices), the share of valid queries that match it.

    >>> maps = AttentionMaps.from_tensors({"x": torch.eye(3).expand(1, 2, 3, 3)}, kinds="cross")
    >>> alignment(maps, "x", torch.arange(3)).score
    1.0
    """
    weights = attn.display(name).weights.float().mean(dim=1)
    valid = weights.sum(dim=-1) > 0
    hard = weights.argmax(dim=-1).masked_fill(~valid, -1)
    score = None
    if expected is not None:
        target = _expected_keys(expected, hard, name)
        score = float((hard == target)[valid].float().mean()) if bool(valid.any()) else float("nan")
    return Alignment(hard, score)


def _expected_keys(expected: Any, hard: Tensor, name: str) -> Tensor:
    """``expected`` as (batch, query) key indices beside ``hard``, or an error that says which
    shapes fit."""
    batch, queries = hard.shape
    fits = f"give (query,) = ({queries},) or (batch, query) = ({batch}, {queries}) key indices"
    try:
        target = torch.as_tensor(expected)
    except (TypeError, ValueError, RuntimeError) as error:
        raise AttnScopeError(
            f"expected for {name!r} is not a tensor of key indices ({error}); {fits}"
        ) from None
    if target.is_complex() or target.dtype == torch.bool:
        raise AttnScopeError(f"expected for {name!r} holds {target.dtype}, not key indices; {fits}")
    if tuple(target.shape) not in ((queries,), (1, queries), (batch, queries)):
        raise AttnScopeError(
            f"expected for {name!r} has shape {tuple(target.shape)} but {name!r} has {queries} "
            f"queries and {batch} batch items; {fits}"
        )
    return target.to(hard.device).expand(batch, queries)
