"""Hand-written attention: the softmax a module computes itself, found by what runs.

Design note
-----------
Many models (DeBERTa, XLNet, XLM, MPNet, OpenAI-GPT, ...) and many users' modules have no sdpa
path: they compute ``softmax(scores)`` with PyTorch's own softmax and multiply the values by
it. While a capture runs, ``Tensor.softmax`` and ``torch.softmax`` (``F.softmax`` and
``nn.Softmax`` call the former) are thin wrappers (``intercept.Replacement``): each call runs
unchanged, and its result, computed on the capturing thread, is offered to the capture's
listeners with its axis and the modules on the stack (``intercept.CallingModules``, read only
if asked), whatever those modules are called. The sdpa session maps a (batch, heads, query,
key) or (batch × heads, query, key) softmax over the last axis, and notes the others' shapes
to say, in ``attn.skipped``, what an attention module computed that it could not map.

A listener either takes the softmax at once (inside a module it already knows is attention)
or asks to see whether it is attention: whether the module then multiplies something by it.
The products attention uses (``@``, ``matmul``, ``bmm``, ``einsum``) are wrapped too, and the
first one given a tensor sharing the softmax's storage (the softmax itself, or a view of it)
hands the listener the softmax as it is then (after any in-place masking the model applied),
before the product runs. A softmax nothing multiplies (a classifier's probabilities) is never
recorded. Those are the model's own numbers, exact by construction, and the output is
untouched. Everything is restored on exit, as every replacement is.

Costs: one Python call per softmax and per product while a capture is active; a storage
comparison per product only while a softmax waits (weakly held, so a tensor the model drops
is forgotten with it).
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, Protocol

import torch
from torch import Tensor

from ..intercept import CallingModules, Replacement, enlist

Finish = Callable[[Tensor], None]


class SoftmaxListener(Protocol):
    thread: int

    def on_softmax(
        self, weights: Tensor, axis: int | None, callers: CallingModules
    ) -> Finish | None:
        """A softmax over ``axis`` of ``weights``: take it now or ignore it (return None), or
        return what to call with it once it multiplies something (the sign of attention)."""


_listeners: list[SoftmaxListener] = []
_SOFTMAXES = ((torch.Tensor, "softmax"), (torch, "softmax"))  # F.softmax calls the first
_PRODUCTS_USED = (  # what multiplies values by weights in hand-written attention
    (torch.Tensor, "__matmul__"),
    (torch.Tensor, "matmul"),
    (torch, "matmul"),
    (torch.Tensor, "bmm"),
    (torch, "bmm"),
    (torch, "einsum"),
)
_Entry = tuple[int, "weakref.ref[Tensor]", SoftmaxListener, Finish]
_MAX_WAITING = 64  # softmaxes awaiting a product, per thread; the oldest are forgotten


class _Waiting(threading.local):
    def __init__(self) -> None:
        self.softmaxes: list[_Entry] = []  # (storage, softmax, listener, finish)


_waiting = _Waiting()


def _dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``dim`` of ``softmax(input, dim)`` / ``input.softmax(dim)``, however it was passed."""
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


def _storage(tensor: Tensor) -> int | None:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # no storage (meta, some subclasses)
        return None


def _softmax_handler(replacement: Callable[[], Replacement]) -> Callable[..., Any]:
    def observed_softmax(*args: Any, **kwargs: Any) -> Any:
        output = replacement().call_original(*args, **kwargs)  # exactly as it was called
        if _listeners and isinstance(output, Tensor) and output.dim():
            dim = _dim(args, kwargs)
            axis = dim % output.dim() if isinstance(dim, int) else None
            thread = threading.get_ident()
            callers = CallingModules(sys._getframe(1))
            for listener in tuple(_listeners):
                if listener.thread != thread:
                    continue
                finish = listener.on_softmax(output, axis, callers)
                storage = None if finish is None else _storage(output)
                if finish is not None and storage is not None:
                    waiting = _waiting.softmaxes
                    waiting.append((storage, weakref.ref(output), listener, finish))
                    del waiting[:-_MAX_WAITING]
        return output

    return observed_softmax


def _product_handler(replacement: Callable[[], Replacement]) -> Callable[..., Any]:
    def observed_product(*args: Any, **kwargs: Any) -> Any:
        waiting = _waiting.softmaxes
        if waiting:
            _hand_over(waiting, args)
        return replacement().call_original(*args, **kwargs)

    return observed_product


def _hand_over(waiting: list[_Entry], args: tuple[Any, ...]) -> None:
    storages = {_storage(a) for a in args if isinstance(a, Tensor)}
    for entry in tuple(waiting):
        storage, ref, _, finish = entry
        weights = ref()
        if weights is None or storage in storages:
            waiting.remove(entry)
            if weights is not None:
                finish(weights)


def _wrapped(
    namespace: Any, attribute: str, handler: Callable[[Callable[[], Replacement]], Any]
) -> Replacement:
    made: list[Replacement] = []
    made.append(Replacement(namespace, attribute, handler(lambda: made[0])))
    return made[0]


_SOFTMAX = tuple(_wrapped(ns, attr, _softmax_handler) for ns, attr in _SOFTMAXES)
_PRODUCTS = tuple(_wrapped(ns, attr, _product_handler) for ns, attr in _PRODUCTS_USED)


def hold(listener: SoftmaxListener, stack: ExitStack) -> None:
    """Offer ``listener`` every 4-D softmax over the last axis until ``stack`` closes."""

    waiting = _waiting.softmaxes  # this thread's: the listener's

    def forget() -> None:  # its softmaxes still waiting, which no product took
        waiting[:] = [entry for entry in waiting if entry[2] is not listener]

    stack.callback(forget)
    enlist(_listeners, listener, stack)
    for replacement in (*_SOFTMAX, *_PRODUCTS):
        replacement.hold(stack)
