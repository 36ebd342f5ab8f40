"""Hand-written attention: the softmax an attention module computes itself.

Design note
-----------
Many models (DeBERTa, XLNet, XLM, MPNet, OpenAI-GPT, ...) have no sdpa path: their attention
module computes ``softmax(scores)`` with PyTorch's own softmax and multiplies the values by it,
returning the weights only when asked (``output_attentions=True``). While a capture observes
such a module (the sdpa adapter finds modules named like attention), ``Tensor.softmax`` and
``torch.softmax`` (``F.softmax`` and ``nn.Softmax`` call the former) are thin wrappers
(``intercept.Replacement``): each call runs unchanged, and a (batch, heads, query, key) result
over the last axis, computed inside an observed attention module on the capturing thread, is
handed to that module's session as a copy. Those are the model's own numbers, exact by
construction, and the output is untouched. Restored on exit, as every replacement is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, Protocol

import torch
from torch import Tensor

from ..intercept import Replacement, enlist


class SoftmaxListener(Protocol):
    thread: int

    def on_softmax(self, weights: Tensor) -> None: ...


_listeners: list[SoftmaxListener] = []


def _dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``dim`` of ``softmax(input, dim)`` / ``input.softmax(dim)``, however it was passed."""
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


def _handler(replacement: Callable[[], Replacement]) -> Callable[..., Any]:
    def observed_softmax(*args: Any, **kwargs: Any) -> Any:
        output = replacement().call_original(*args, **kwargs)  # exactly as it was called
        heads_first = isinstance(output, Tensor) and output.dim() == 4
        if _listeners and heads_first and _dim(args, kwargs) in (-1, 3):
            thread = threading.get_ident()
            for listener in tuple(_listeners):
                if listener.thread == thread:
                    listener.on_softmax(output)
        return output

    return observed_softmax


_METHOD: Replacement = Replacement(torch.Tensor, "softmax", _handler(lambda: _METHOD))
_FUNCTION: Replacement = Replacement(torch, "softmax", _handler(lambda: _FUNCTION))


def hold(listener: SoftmaxListener, stack: ExitStack) -> None:
    """Hand ``listener`` every 4-D softmax over the last axis until ``stack`` closes."""

    enlist(_listeners, listener, stack)
    _METHOD.hold(stack)
    _FUNCTION.hold(stack)
