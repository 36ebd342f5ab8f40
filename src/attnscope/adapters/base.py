"""The adapter protocol: where a family's attention lives, and how a capture observes it.

An adapter is any object with ``name``, ``recognises`` (a few words for error messages),
``attention_modules(model)`` (the modules it knows statically, by qualified name) and
``install(model, selected, recorder, stack, keep)``: observe ``selected`` (what the user's
``include``/``exclude`` left of its modules) until ``stack`` closes, and hand each attention
computation to ``recorder.record(name, AttentionCall(...))``. ``keep(name)`` filters modules
found only at run time. Use ``attnscope.intercept.observe(module, observer, stack)`` to run
code around a module's forward and ``attnscope.intercept.Replacement`` to stand in front of a
function: both restore everything when the stack closes, in any order, and keep to the
capturing thread. ``tests/test_adapters.py`` has a worked example.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Protocol

from torch import nn

from ..calls import AttentionCall

__all__ = ["Adapter", "AttentionCall", "Recorder", "Session"]


class Recorder(Protocol):
    """Receives each attention computation; calls ``compute`` only when and as it needs."""

    keep: bool  # lazy: computations run later, so adapters copy what may change meanwhile
    calls: int  # how many calls were recorded so far, by any adapter
    wants_outputs: bool  # gradients or norms: calls should carry values and kernel outputs

    def record(self, name: str, call: AttentionCall) -> None: ...

    def skip(self, name: str, why: str) -> None:
        """A module that ran but whose attention cannot be mapped: listed in ``attn.skipped``."""


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


class Session:
    """One capture's view of one model, for an adapter that finds calls at run time (a kernel
    called somewhere below a module): the module names, what was selected, and the thread."""

    def __init__(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        keep: Callable[[str], bool],
    ) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.selected = {id(m) for m in selected.values()}
        self.recorder = recorder
        self.keep = keep
        self.thread = threading.get_ident()
        self.kinds: dict[int, str] = {}  # a module's kind is fixed by its first call
        self._kept: dict[int, bool] = {}  # keep(name) of each module met, asked once

    @property
    def wants_outputs(self) -> bool:
        return bool(getattr(self.recorder, "wants_outputs", False))

    def owner(self, callers: Iterable[nn.Module]) -> tuple[nn.Module, str] | None:
        """The innermost of ``callers`` that is this model's and that the capture keeps."""
        module = next((m for m in callers if id(m) in self.names), None)
        if module is None:
            return None
        key = id(module)
        name = self.names[key]
        kept = self._kept.get(key)
        if kept is None:  # a module's name is fixed: one match of the filters per capture
            kept = self._kept[key] = key in self.selected or self.keep(name)
        return (module, name) if kept else None
