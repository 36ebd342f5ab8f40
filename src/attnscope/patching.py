"""Observe a module's calls, with their keyword arguments, without a hook on it.

Design note
-----------
Why not hooks: ``nn.TransformerEncoderLayer`` gives up its fused kernel as soon as any forward
hook or pre-hook sits on it or on one of its submodules, and global module hooks never see
keyword arguments, where ``nn.Transformer*`` pass every mask. So attnscope observes a module by
giving it an instance attribute ``forward`` (looked up before the class's method by
``Module.__call__``) that calls the module's own forward unchanged, wrapped in the observers'
"around" functions. The fused-path checks read hook dictionaries, never ``forward``.

Lifetimes: one wrapper per module however many captures watch it. ``observe`` returns a
handle; the last handle removed takes the wrapper away and restores whatever ``forward``
instance attribute the module had before (usually none), so captures may end in any order.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

Proceed = Callable[[], Any]


class Observer(Protocol):
    """Called around a module's forward: must call ``proceed()`` once and return its result."""

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any: ...


_MISSING = object()


class _Patch:
    def __init__(self, module: nn.Module) -> None:
        self.previous = module.__dict__.get("forward", _MISSING)
        self.observers: list[Observer] = []
        original = module.forward
        module_ref = weakref.ref(module)

        @functools.wraps(original)
        def observed_forward(*args: Any, **kwargs: Any) -> Any:
            target = module_ref()
            observers = tuple(self.observers)
            if target is None or not observers:
                return original(*args, **kwargs)
            return _call_chain(target, observers, original, args, kwargs)

        self.wrapper = observed_forward


def _call_chain(
    module: nn.Module,
    observers: tuple[Observer, ...],
    original: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    if not observers:
        return original(*args, **kwargs)
    first, rest = observers[0], observers[1:]
    return first(module, args, kwargs, lambda: _call_chain(module, rest, original, args, kwargs))


_patches: weakref.WeakKeyDictionary[nn.Module, _Patch] = weakref.WeakKeyDictionary()


class ObserverHandle:
    """Removes one observer; removing the last one restores the module's ``forward``."""

    def __init__(self, module: nn.Module, observer: Observer) -> None:
        self._module = weakref.ref(module)
        self._observer = observer
        self._removed = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        module = self._module()
        if module is None:
            return
        patch = _patches.get(module)
        if patch is None:
            return
        patch.observers.remove(self._observer)
        if not patch.observers:
            del _patches[module]
            if patch.previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = patch.previous


def observe(module: nn.Module, observer: Observer) -> ObserverHandle:
    """Run ``observer`` around every call of ``module`` until the handle is removed.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> seen = []
    >>> def note(module, args, kwargs, proceed):
    ...     seen.append(args[0].shape)
    ...     return proceed()
    >>> handle = observe(layer, note)
    >>> _ = layer(torch.zeros(3, 2))
    >>> handle.remove()
    >>> seen, "forward" in layer.__dict__
    ([torch.Size([3, 2])], False)
    """
    patch = _patches.get(module)
    if patch is None:
        patch = _Patch(module)
        _patches[module] = patch
        module.__dict__["forward"] = patch.wrapper
    patch.observers.append(observer)
    return ObserverHandle(module, observer)


def is_observed(module: nn.Module) -> bool:
    """Whether any capture currently observes ``module``."""
    return module in _patches
