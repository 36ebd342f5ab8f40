"""Attention flow (Abnar & Zuidema, ACL 2020): maximum flow through the layered attention graph.

Design note
-----------
Nodes are (layer, token) for layers 0..L (layer 0 is the input); an edge from (l-1, key) to
(l, query) has as capacity the residual-augmented, row-normalised, head-fused weight of layer
l (the same matrices as rollout). ``flow[b, i, j]`` is the value of a maximum flow from input
token ``j`` to last-layer token ``i``. Each value is an exact max-flow, computed by SciPy's
compiled Dinic solver (``scipy.sparse.csgraph.maximum_flow``) on integer capacities (weights
times 2**30, so the result is within about 1e-7 of the real-valued max-flow); the public code
runs networkx's pure-Python solver instead, which is what makes it slow. ``scipy`` is needed
for ``flow`` only (extra ``attnscope[analysis]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .analysis import layer_matrices
from .errors import AttnScopeError
from .maps import AttentionMaps

SCALE = 2**30
_SECONDS_PER_EDGE = 5e-8  # measured on 2 cores: 6 layers x 64 tokens took 5.2 s


def flow_estimate_seconds(layers: int, tokens: int, batch: int = 1) -> float:
    """A rough time estimate: tokens² max-flows on a graph of layers x tokens² edges."""
    return batch * tokens**2 * layers * tokens**2 * _SECONDS_PER_EDGE


def flow(
    attn: AttentionMaps,
    *,
    kind: str = "self",
    head_fusion: str = "mean",
    max_seconds: float = 600.0,
) -> Tensor:
    """Attention flow: (batch, query, key) max-flow from each input token to each output token.

    >>> uniform = torch.full((1, 1, 2, 2), 0.5)
    >>> flow(AttentionMaps.from_tensors({"l0": uniform, "l1": uniform}))[0]
    tensor([[1.0000, 0.5000],
            [0.5000, 1.0000]])
    """
    try:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow
    except ImportError:
        raise AttnScopeError("flow() needs scipy: pip install 'attnscope[analysis]'") from None
    layers, padded = layer_matrices(attn, kind, head_fusion)
    batch, tokens = padded.shape
    estimate = flow_estimate_seconds(len(layers), tokens, batch)
    if estimate > max_seconds:
        raise AttnScopeError(
            f"attention flow over {len(layers)} layers x {tokens} tokens x batch {batch} would "
            "take "
            f"about {estimate:,.0f} s (over max_seconds={max_seconds:,.0f}); use rollout(), fewer "
            "tokens or layers (attn.select(include=...)), or raise max_seconds"
        )
    out = torch.zeros(batch, tokens, tokens, dtype=torch.float64)
    for item in range(batch):
        graph = _graph(csr_matrix, [m[item] for m in layers])
        top = len(layers) * tokens
        for query in range(tokens):
            if bool(padded[item, query]):
                continue
            for key in range(tokens):
                if bool(padded[item, key]):
                    continue
                result = maximum_flow(graph, key, top + query, method="dinic")
                out[item, query, key] = result.flow_value / SCALE
    return out.float()


def _graph(csr_matrix: type, matrices: list[Tensor]) -> object:
    """The layered graph as an int32 CSR matrix; node (l, t) is l * tokens + t."""
    tokens = matrices[0].size(-1)
    rows, cols, caps = [], [], []
    for layer, matrix in enumerate(matrices, start=1):
        capacity = torch.round(matrix.double() * SCALE).to(torch.int64)  # [query, key]
        query, key = torch.nonzero(capacity, as_tuple=True)
        rows.append((layer - 1) * tokens + key)
        cols.append(layer * tokens + query)
        caps.append(capacity[query, key])
    size = (len(matrices) + 1) * tokens
    return csr_matrix(
        (
            torch.cat(caps).numpy().astype("int32"),
            (torch.cat(rows).numpy(), torch.cat(cols).numpy()),
        ),
        shape=(size, size),
    )
