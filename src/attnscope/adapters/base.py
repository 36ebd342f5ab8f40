"""What every adapter gives the capture: where attention lives, and how to observe it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass
class AttentionCall:
    """One attention computation, ready to produce its weights on demand.

    ``compute(rows)`` gives (batch, heads, query, key) weights, for the query positions
    ``rows`` (a LongTensor) only when given. ``held`` are the tensors it reads, which a lazy
    capture keeps instead of the weights.
    """

    kind: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    compute: Callable[[Tensor | None], Tensor]
    held: tuple[Tensor, ...] = ()

    @classmethod
    def of_weights(cls, kind: str, weights: Tensor) -> AttentionCall:
        """A call whose (batch, heads, query, key) weights the kernel already returned."""
        batch, heads, queries, keys = weights.shape
        return cls(
            kind,
            (batch, heads, queries, keys),
            weights.dtype,
            lambda rows: weights if rows is None else weights[:, :, rows],
            (weights,),
        )


class Recorder(Protocol):
    """Receives each attention computation; calls ``compute`` only when and as it needs."""

    keep: bool  # lazy: computations run later, so adapters copy what may change meanwhile

    def record(self, name: str, call: AttentionCall) -> None: ...


class Adapter(Protocol):
    """One family of models: finds its attention modules and observes them during a capture."""

    name: str
    recognises: tuple[str, ...]

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]: ...

    def install(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        stack: ExitStack,
        keep: Callable[[str], bool],
    ) -> None:
        """Observe ``selected`` until ``stack`` closes; ``keep`` filters names found at run time."""
