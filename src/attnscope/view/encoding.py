"""How the page's maps travel: one byte a weight, base64 per head, pooled thumbnails.

Design note
-----------
A map is quantised to one byte per cell, ``round(w / scale * 255)``: attention weights with
scale 1 (they are probabilities), a weighted view's maps (``attn.weighted``) each with its own
maximum as scale, since norm-weighted and gradient-weighted values are not in [0, 1] and their
range differs from head to head. The scale rides along, so the page turns a byte back into the
true value (``byte / 255 * scale``). Thumbnails are max-pooled to at most ``THUMB`` x ``THUMB``
and quantised to their own peak, which the max pool keeps equal to the map's maximum.
"""

from __future__ import annotations

import base64

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

THUMB = 64


def quantise(weights: Tensor, scale: float = 1.0) -> bytes:
    """One byte per value of ``weights`` / ``scale`` (values in [0, scale]).

    >>> list(quantise(torch.tensor([0.0, 0.5, 2.0]), scale=2.0))
    [0, 64, 255]
    """
    scaled = weights if scale == 1.0 else weights / (scale if scale > 0 else 1.0)
    byte = torch.round(scaled.clamp(0, 1) * 255).to(torch.uint8)
    return bytes(byte.contiguous().numpy().tobytes())


def peaks(single: Tensor) -> list[float]:
    """Each head's maximum of (heads, query, key) values, as the page's scales.

    >>> peaks(torch.tensor([[[0.0, 3.0]], [[0.0, 0.0]]]))
    [3.0, 0.0]
    """
    return [float(v) for v in single.amax(dim=(1, 2))]


def thumbnails(single: Tensor) -> dict[str, object]:
    """Max-pooled thumbnails of (heads, query, key) values, each quantised to its peak."""
    heads, queries, keys = single.shape
    size = (min(THUMB, queries), min(THUMB, keys))
    pooled = F.adaptive_max_pool2d(single.unsqueeze(0), size)[0]
    peak = pooled.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return {
        "q": size[0],
        "k": size[1],
        "data": [b64(quantise(pooled[h] / peak[h])) for h in range(heads)],
        "peak": peaks(pooled),
    }


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
