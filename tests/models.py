"""Tiny fixture models and the modes attnscope must work in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

MODES = ("train", "eval", "no_grad", "inference_mode")
D_MODEL, HEADS = 16, 4


@contextlib.contextmanager
def mode(model: nn.Module, name: str) -> Iterator[None]:
    """Put ``model`` in one of the modes attnscope must work in."""
    model.train(name == "train")
    if name == "no_grad":
        with torch.no_grad():
            yield
    elif name == "inference_mode":
        with torch.inference_mode():
            yield
    elif name == "autocast":
        # Grad stays on: under CPU autocast + no_grad, torch 2.13's fused encoder path is taken
        # (torch.is_autocast_enabled() only looks at CUDA) and fails on bfloat16 by itself.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def encoder(
    batch_first: bool = True,
    norm_first: bool = False,
    layers: int = 2,
    dropout: float = 0.0,
    seed: int = 0,
    layer_cls: type = nn.TransformerEncoderLayer,
) -> nn.Module:
    torch.manual_seed(seed)
    layer = layer_cls(
        D_MODEL,
        HEADS,
        dim_feedforward=32,
        dropout=dropout,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=not norm_first)


def transformer(
    batch_first: bool = True, norm_first: bool = False, dropout: float = 0.0, seed: int = 0
) -> nn.Transformer:
    torch.manual_seed(seed)
    return nn.Transformer(
        D_MODEL, HEADS, 2, 2, 32, dropout=dropout, batch_first=batch_first, norm_first=norm_first
    )


def sequence(batch: int, length: int, batch_first: bool = True, seed: int = 1) -> Tensor:
    x = torch.randn(batch, length, D_MODEL, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1).contiguous()


def padding(lengths: list[int], total: int) -> Tensor:
    """(batch, total) bool, True at padded positions (right padding)."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]
