"""What every adapter gives the capture: where attention lives, and how to observe it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Protocol

import torch
from torch import Tensor, nn


class Recorder(Protocol):
    """Receives one attention computation; calls ``compute`` only if it keeps the weights."""

    def record(
        self,
        name: str,
        kind: str,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        compute: Callable[[], Tensor],
    ) -> None: ...


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
