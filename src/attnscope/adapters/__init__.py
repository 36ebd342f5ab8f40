"""Adapters: one per family of models, each turning its attention into ``AttentionCall``s."""

from __future__ import annotations

from .base import Adapter, Recorder
from .sdpa import SdpaAdapter
from .torch_nn import TorchNNAdapter


def default_adapters() -> list[Adapter]:
    """The adapters ``capture`` tries, in order."""
    return [TorchNNAdapter(), SdpaAdapter()]


__all__ = ["Adapter", "Recorder", "SdpaAdapter", "TorchNNAdapter", "default_adapters"]
