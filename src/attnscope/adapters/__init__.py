"""Adapters: one per family of models, each turning its attention into ``AttentionCall``s.

The registry: ``capture`` asks the adapters in order of priority (highest first; equal
priorities in the order they were registered), and a module one adapter claims is not offered
to the next. Built in: PyTorch's own attention (``torch.nn``, priority 20), FlexAttention
(``flex``, 15) and everything that calls ``scaled_dot_product_attention`` (``sdpa``, 10). A
user's adapter, registered with ``attnscope.register_adapter`` or passed as
``capture(model, adapters=[...])``, comes first by default (priority 50). The protocol is in
``attnscope.adapters.base``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from ..errors import AttnScopeError
from .base import Adapter, Recorder
from .flex import FlexAdapter
from .sdpa import SdpaAdapter
from .torch_nn import TorchNNAdapter

USER_PRIORITY = 50
_registry: list[tuple[int, int, Adapter]] = []
_order = itertools.count()


def register_adapter(adapter: Adapter, *, priority: int = USER_PRIORITY) -> Callable[[], None]:
    """Make every later capture use ``adapter`` (ahead of those of lower ``priority``);
    returns the undo.

    >>> class Nothing:
    ...     name, recognises = "nothing", ("nothing at all",)
    ...     def attention_modules(self, model): return {}
    ...     def install(self, model, selected, recorder, stack, keep): pass
    >>> unregister = register_adapter(Nothing(), priority=5)
    >>> [a.name for a in default_adapters()]
    ['torch.nn', 'flex', 'sdpa', 'nothing']
    >>> unregister()
    """
    check_adapter(adapter)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise AttnScopeError(f"priority must be an int (higher runs first), got {priority!r}")
    entry = (priority, next(_order), adapter)
    _registry.append(entry)

    def unregister() -> None:
        if entry in _registry:
            _registry.remove(entry)

    return unregister


def default_adapters(extra: Iterable[Adapter] = ()) -> list[Adapter]:
    """The adapters ``capture`` asks, in order: ``extra`` first, then the registry's."""
    chosen = list(extra)
    for adapter in chosen:
        check_adapter(adapter)
    ranked = sorted(_registry, key=lambda entry: (-entry[0], entry[1]))
    return chosen + [adapter for _, _, adapter in ranked]


def check_adapter(adapter: object) -> None:
    """Refuse, saying what is missing, an object that does not follow the adapter protocol."""
    missing = [
        part
        for part in ("name", "recognises", "attention_modules", "install")
        if not hasattr(adapter, part)
    ]
    if missing:
        raise AttnScopeError(
            f"{type(adapter).__name__} is not an attnscope adapter: it lacks "
            f"{', '.join(missing)}. An adapter has `name`, `recognises` (a tuple of str), "
            "`attention_modules(model)` and `install(model, selected, recorder, stack, keep)`; "
            "see attnscope.adapters.base"
        )


register_adapter(TorchNNAdapter(), priority=20)
register_adapter(FlexAdapter(), priority=15)  # ahead of sdpa: it claims modules named attention
register_adapter(SdpaAdapter(), priority=10)

__all__ = [
    "Adapter",
    "Recorder",
    "SdpaAdapter",
    "TorchNNAdapter",
    "check_adapter",
    "default_adapters",
    "register_adapter",
]
