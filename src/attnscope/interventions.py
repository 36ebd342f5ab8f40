"""``attnscope.ablate`` and ``attnscope.knockout``: test a claim about heads and edges by
intervening on them inside the model's own kernel calls (the mechanism: ``attnscope.edits``).

Both are context managers that change nothing of the model: the edits live while the block
runs, on the thread that entered it, and everything is restored on every exit. A capture
inside the block sees what the model saw: knocked-out edges are zeros in its maps.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from . import edits
from .adapters import default_adapters
from .adapters.hf import PYTORCH_PADDING, given_paddings, head_count, padding_scopes
from .adapters.sdpa import hold_edits
from .errors import AttnScopeError
from .intercept import Proceed, observe

HOWS = ("zero", "mean")
_HF_PADDING = ("attention_mask", "decoder_attention_mask")  # 1 = keep


@contextlib.contextmanager
def ablate(
    model: nn.Module, heads: Mapping[str, Sequence[int]], how: str = "zero"
) -> Iterator[None]:
    """Ablate attention heads: inside the block, the outputs of ``heads`` (``{module name:
    [head, ...]}``, names as in ``attn.names``) are zeroed before the output projection
    (``how="zero"``), or replaced by their mean over the batch's real tokens (``"mean"``: over
    every (batch, position) the model's ``attention_mask`` or ``src_key_padding_mask`` keeps,
    all positions without one; computed in the same forward).

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    >>> x = torch.randn(1, 4, 8)
    >>> with torch.no_grad(), ablate(model, {"layers.0.self_attn": [0, 1]}):
    ...     ablated = model(x)  # no head left: the attention adds only out_proj's bias
    >>> with torch.no_grad():
    ...     plain = model(x)
    >>> bool((ablated - plain).abs().max() > 0)
    True
    """
    if how not in HOWS:
        raise AttnScopeError(f"how= takes 'zero' or 'mean', got {how!r}")
    modules = _modules(model, heads, "ablate")
    paddings: dict[str, Tensor | None] = {}  # the model's padding arguments, this forward
    for name, module in modules.items():
        _check_heads(name, module, heads[name])
    scopes = padding_scopes(model, {id(m): n for n, m in model.named_modules()})

    def valid_of(name: str) -> Callable[[], Tensor | None]:
        # the padding argument whose scope (a module-name prefix) is the longest that holds
        # this module: an encoder-decoder's decoder has its own; cross-attention's queries
        # are the decoder's positions too
        argument = max(
            (a for a, prefix in scopes.items() if not prefix or name.startswith(prefix + ".")),
            key=lambda a: len(scopes[a]),
            default=None,
        )

        def valid() -> Tensor | None:
            padding = paddings.get(argument) if argument else paddings.get("")
            return None if padding is None else ~padding

        return valid

    chosen = {
        module: edits.Edit(
            name,
            heads=edits.zero_heads(list(heads[name]))
            if how == "zero"
            else edits.mean_heads(list(heads[name]), valid_of(name)),
        )
        for name, module in modules.items()
    }
    with contextlib.ExitStack() as stack:
        if how == "mean":
            observe(model, _padding_observer(paddings), stack)
        check = _activate(edits.EditSet(chosen), modules, stack)
        yield
        check()


@contextlib.contextmanager
def knockout(model: nn.Module, edges: Mapping[str, Sequence[tuple[int, int]]]) -> Iterator[None]:
    """Block attention edges (Geva et al. 2023): inside the block, for every batch item and
    head of each module (``{module name: [(query, key), ...]}``, positions from 0), the score
    of ``key`` for ``query`` is ``-inf`` in the mask the model's own kernel is given. Positions
    outside a call's sequence raise at the forward.

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    >>> from attnscope import capture
    >>> with torch.no_grad(), knockout(model, {"layers.0.self_attn": [(2, 0)]}):
    ...     with capture(model) as attn:
    ...         _ = model(torch.randn(1, 4, 8))
    >>> attn["layers.0.self_attn"][0, :, 2, 0]
    tensor([0., 0.])
    """
    modules = _modules(model, edges, "knockout")
    chosen = {}
    for name, module in modules.items():
        pairs = list(edges[name])
        for pair in pairs:
            if not (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)
            ):
                raise AttnScopeError(
                    f"knockout: {name!r} takes (query, key) pairs of positions from 0, got "
                    f"{pair!r}; e.g. knockout(model, {{{name!r}: [(5, 2)]}})"
                )
        chosen[module] = edits.Edit(name, edges=[(int(q), int(k)) for q, k in pairs])
    with contextlib.ExitStack() as stack:
        check = _activate(edits.EditSet(chosen), modules, stack)
        yield
        check()


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules every adapter finds in ``model``, by name (as ``attn.names``)."""
    found: dict[str, nn.Module] = {}
    for adapter in default_adapters(()):
        for name, module in adapter.attention_modules(model).items():
            found.setdefault(name, module)
    return found


def _modules(model: nn.Module, wanted: Mapping[str, Any], what: str) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise AttnScopeError(f"{what}() takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(wanted, Mapping) or not wanted:
        raise AttnScopeError(
            f"{what}() takes a mapping from attention module names to what to change, e.g. "
            f"{what}(model, {{'encoder.layer.0.attention.self': ...}}); got {wanted!r}"
        )
    known = attention_modules(model)
    modules = {}
    for name in wanted:
        module = known.get(name)
        if module is None:
            close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            listed = ", ".join(list(known)[:12]) + (", ..." if len(known) > 12 else "")
            raise AttnScopeError(
                f"{what}: no attention module named {name!r} in this model.{hint} "
                f"Attention modules: {listed or 'none found'}"
            )
        modules[name] = module
    return modules


def _check_heads(name: str, module: nn.Module, heads: Sequence[int]) -> None:
    count = module.num_heads if isinstance(module, nn.MultiheadAttention) else head_count(module)
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or not heads:
        raise AttnScopeError(f"ablate: {name!r} takes a list of head indices, got {heads!r}")
    for head in heads:
        if not isinstance(head, int) or isinstance(head, bool) or head < 0:
            raise AttnScopeError(f"ablate: head {head!r} of {name!r} is not a head index")
        if count is not None and head >= count:
            raise AttnScopeError(
                f"ablate: head {head} of {name!r} is out of range: it has {count} heads "
                f"(0..{count - 1})"
            )


def _activate(
    chosen: edits.EditSet, modules: dict[str, nn.Module], stack: Any
) -> Callable[[], None]:
    """The edits on (PyTorch's fused MHA paths aside on this thread where one is edited),
    undone with ``stack``; the returned check raises if an edited module ran without its edit
    reaching any of its calls."""
    slow_paths = any(isinstance(m, nn.MultiheadAttention) for m in modules.values())
    ran: dict[int, int] = {}

    def count(module: nn.Module, args: Any, kwargs: Any, proceed: Proceed) -> Any:
        ran[id(module)] = ran.get(id(module), 0) + 1
        return proceed()

    for module in modules.values():
        observe(module, count, stack)
    hold_edits(stack)
    stack.callback(edits.activate(chosen, slow_paths=slow_paths))

    def check() -> None:
        for name, module in modules.items():
            edit = chosen.edit_of(module)
            missed = [] if edit is None else [e for e in edit.edges if e not in edit.matched]
            if ran.get(id(module)) and chosen.applied.get(id(module)) and missed:
                raise AttnScopeError(
                    f"knockout: edge {missed[0]} of {name!r} names a query position that none "
                    "of its calls had (outside the sequence; positions from 0): nothing was "
                    "knocked out there"
                )
            if ran.get(id(module)) and not chosen.applied.get(id(module)):
                raise AttnScopeError(
                    f"{name!r} ran, but none of its calls reached scaled_dot_product_attention, "
                    "where attnscope edits attention: it computes its attention itself (an eager "
                    "implementation: load the model with attn_implementation='sdpa'; "
                    "nn.MultiheadAttention asked for its weights: call it with "
                    "need_weights=False), so nothing of it was edited"
                )

    return check


def _padding_observer(paddings: dict[str, Tensor | None]) -> Any:
    """Notes each forward's padding arguments, (batch, length) True at padding: a Hugging
    Face model's ``attention_mask`` and ``decoder_attention_mask`` (1 = keep), by keyword or
    by position; a PyTorch encoder's ``src_key_padding_mask`` (True = pad) as ``""``."""

    def note(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        given = given_paddings(module, args, kwargs, (*_HF_PADDING, *PYTORCH_PADDING))
        now: dict[str, Tensor | None] = {argument: given.get(argument) for argument in _HF_PADDING}
        pytorch = given.get("src_key_padding_mask", given.get("key_padding_mask"))
        if pytorch is not None:
            now[""] = pytorch
        before = dict(paddings)
        paddings.clear()
        paddings.update(now)
        try:
            return proceed()
        finally:
            paddings.clear()
            paddings.update(before)

    return note
