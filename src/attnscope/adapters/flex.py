"""Adapter for FlexAttention: ``torch.nn.attention.flex_attention.flex_attention``.

Design note
-----------
What is replaced. While a capture is active, ``flex_attention`` on its module is a thin
``Replacement`` that calls the original with the original arguments (the output, and the
``return_lse`` / ``return_aux`` extras, are the kernel's own) and then hands the call to the
capture. Most code binds the function at import
(``from torch.nn.attention.flex_attention import flex_attention``), a name the attribute
replacement never reaches; so the globals of the captured model's code that hold the function
(its classes' methods, and the module-level functions they call, two levels deep) are replaced
too, through their own ``Replacement``, and restored on exit like the attribute. What cannot be
replaced without changing the model is warned of, naming the module, and the module is listed
in ``attn.skipped`` when it runs and nothing is recorded for it: a compiled
``torch.compile(flex_attention)``, a ``functools.partial`` of it, an instance attribute
holding it (replacing that would make the model unpicklable during the capture).

Weights. Eager ``flex_attention`` (measured on torch 2.13, CPU) compiles the higher-order op
with Dynamo's ``eager`` backend, which runs PyTorch's dense reference (``math_attention``):
``scores = (q kᵀ) · scale`` in float32 (float64 for float64 inputs), ``score_mod`` vmapped
over (batch, head, q_idx, kv_idx), ``-inf`` where ``block_mask.mask_mod`` is False, a softmax
whose fully masked rows are zeros, cast to the query's dtype. The recompute is that, from the
same query, key, ``score_mod``, ``mask_mod`` and scale. The block-level sparsity is not used,
because the eager kernel does not use it either (measured: a ``BlockMask.from_kv_blocks``
without a ``mask_mod`` masks nothing there). GQA gives one map per query head; ``rows=``
evaluates only those query positions.

Attribution and kinds follow the sdpa adapter: the innermost module of the captured model on
the call stack owns the call; a module's first call fixes its kind, "causal" when the first
batch item's and head's modified scores hide every later key and not every earlier one.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .. import pool
from ..calls import kind_of
from ..intercept import CallingModules, Proceed, Replacement, enlist, observe
from ..recompute import _softmax
from .base import AttentionCall, Recorder, Session
from .sdpa import _global_names, _warn_if_unsure

_NAME = "flex_attention"
_DEPTH = 2  # module-level functions followed from a class's methods, for bound references


def _flex_module() -> types.ModuleType | None:
    try:  # imported at capture time, not with attnscope; absent before torch 2.5
        import torch.nn.attention.flex_attention as module
    except ImportError:
        return None
    return module


# -- the replacements, shared by every active capture ----------------------------------------

_sessions: list[_FlexSession] = []
_replacements: weakref.WeakKeyDictionary[types.ModuleType, dict[str, Replacement]] = (
    weakref.WeakKeyDictionary()
)
_wrappers: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()  # every wrapper made here
_lock = threading.Lock()


def _replacement(namespace: types.ModuleType, attribute: str) -> Replacement:
    """The one ``Replacement`` of ``namespace.attribute``, made when first needed."""
    with _lock:
        table = _replacements.setdefault(namespace, {})
        if attribute not in table:
            made: list[Replacement] = []  # the handler needs its replacement: made just below
            # a partial adds no frame: warnings' stack levels stay those of the sdpa adapter
            made.append(Replacement(namespace, attribute, functools.partial(_observed_flex, made)))
            table[attribute] = made[0]
            _wrappers.add(made[0].wrapper)
        return table[attribute]


def _kernel() -> Callable[..., Any] | None:
    module = _flex_module()
    return None if module is None else _replacement(module, _NAME).kernel


def _observed_flex(made: list[Replacement], *args: Any, **kwargs: Any) -> Any:
    replacement = made[0]
    output = replacement.call_original(*args, **kwargs)
    thread = threading.get_ident()
    sessions = [session for session in tuple(_sessions) if session.thread == thread]
    if sessions:
        callers = CallingModules(sys._getframe(1))
        arguments = _signature(replacement.kernel).bind(*args, **kwargs)
        arguments.apply_defaults()
        for session in sessions:
            session.on_flex(callers, arguments.arguments)
    return output


@functools.lru_cache(maxsize=8)
def _signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


# -- where the model's code holds flex_attention ---------------------------------------------

_References = tuple[tuple[dict[str, Any], str], ...]  # (globals, name) a class's code reads
_REFERENCES: weakref.WeakKeyDictionary[type, _References] = weakref.WeakKeyDictionary()


def _references(cls: type) -> _References:
    """The global names the code of ``cls`` reads, with the globals they are read from: its
    methods', and those of the module-level functions they call (``_DEPTH`` deep)."""
    if cls not in _REFERENCES:
        found: dict[tuple[int, str], tuple[dict[str, Any], str]] = {}
        seen: set[int] = set()
        for klass in cls.__mro__:
            if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
                continue
            for value in vars(klass).values():
                if isinstance(value, property):
                    value = value.fget
                _walk(getattr(value, "__func__", value), 0, found, seen)
        _REFERENCES[cls] = tuple(found.values())
    return _REFERENCES[cls]


def _walk(function: Any, depth: int, found: dict[tuple[int, str], Any], seen: set[int]) -> None:
    code, scope = getattr(function, "__code__", None), getattr(function, "__globals__", None)
    if not isinstance(code, types.CodeType) or not isinstance(scope, dict) or id(code) in seen:
        return
    seen.add(id(code))
    for name in set(_global_names(code)):
        found[(id(scope), name)] = (scope, name)
        value = scope.get(name)
        if (
            depth < _DEPTH
            and isinstance(value, types.FunctionType)
            and not str(value.__module__).startswith("torch")
        ):
            _walk(value, depth + 1, found, seen)


def _module_of(scope: dict[str, Any]) -> types.ModuleType | None:
    module = sys.modules.get(str(scope.get("__name__")))
    return module if module is not None and vars(module) is scope else None


def _ours(value: Any, kernel: Callable[..., Any]) -> bool:
    """flex_attention itself, or a wrapper of ours around it."""
    return value is kernel or (isinstance(value, types.FunctionType) and value in _wrappers)


def _unseen(value: Any, kernel: Callable[..., Any]) -> str | None:
    """How ``value`` holds flex_attention out of a replacement's reach, if it does (only a
    function or a partial can: the scan asks this of every global and attribute it reads, and
    a getattr on anything else, a lazily importing module among them, costs more)."""
    if isinstance(value, types.FunctionType):
        if getattr(value, "_torchdynamo_orig_callable", None) is kernel:
            return "a torch.compile(flex_attention)"
        return None
    if isinstance(value, functools.partial) and _ours(value.func, kernel):
        return "a functools.partial of it"
    return None


_HOLDERS = (types.FunctionType, functools.partial)  # what can hold flex_attention (``_unseen``)


class _Scan:
    """Which modules call flex_attention, which globals to replace, which calls are unseen."""

    def __init__(self, model: nn.Module, kernel: Callable[..., Any]) -> None:
        self.kernel = kernel
        self.callers: dict[str, nn.Module] = {}
        self.globals: dict[tuple[int, str], tuple[types.ModuleType, str]] = {}
        self.unseen: dict[str, str] = {}  # module name: how it reaches flex out of sight
        classes: dict[type, tuple[bool, str | None]] = {}
        for name, module in model.named_modules():
            cls = type(module)
            if cls not in classes:
                classes[cls] = self._read(cls)
            calls, how = classes[cls]
            for attribute, value in vars(module).items():
                if not isinstance(value, _HOLDERS):  # the most of them: two calls saved each
                    continue
                why = "an instance attribute" if _ours(value, kernel) else _unseen(value, kernel)
                if how is None and why is not None:
                    how = f"self.{attribute}, {why}"
            if how is not None:
                self.unseen[name] = how
            if calls or how is not None:
                self.callers[name] = module

    def _read(self, cls: type) -> tuple[bool, str | None]:
        """Whether the code of ``cls`` calls flex_attention, and how, if out of sight; the
        globals holding it are noted for replacement."""
        calls, how = False, None
        for scope, attribute in _references(cls):
            value = scope.get(attribute)
            calls = calls or attribute == _NAME
            if value is not self.kernel and not isinstance(value, _HOLDERS):
                continue  # a class, a module, a constant, a name no global holds (most of them)
            ours = _ours(value, self.kernel)
            calls = calls or ours
            home = _module_of(scope) if ours else None
            mine = None if home is None else _replacements.get(home, {}).get(attribute)
            if home is not None and (value is self.kernel or (mine and value is mine.wrapper)):
                self.globals[(id(home), attribute)] = (home, attribute)  # replaced
            elif value is self.kernel:
                how = how or f"{attribute}, a global of code that belongs to no module"
            elif (why := _unseen(value, self.kernel)) is not None:
                how = how or f"{attribute}, {why}"
        return calls, how


_UNSEEN = (
    "calls flex_attention through {how}, out of attnscope's reach: nothing is recorded for "
    "those calls. Call the eager function by a name of its module's globals (`from "
    "torch.nn.attention.flex_attention import flex_attention` at import is fine: attnscope "
    "replaces that name while it captures) or as torch.nn.attention.flex_attention.flex_attention"
)


# -- the adapter ---------------------------------------------------------------------------


class FlexAdapter:
    """Captures every eager ``flex_attention`` call, with its ``score_mod`` and ``block_mask``."""

    name = "flex"
    recognises: tuple[str, ...] = (
        "modules calling torch.nn.attention.flex_attention.flex_attention",
    )

    def __init__(self) -> None:
        # a capture asks for the attention modules, then installs: one scan serves both
        # (scanning every module's attributes was most of a capture's enter and exit)
        self._scans = threading.local()

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        kernel = _kernel()
        if kernel is None:
            return {}
        scan = _Scan(model, kernel)
        self._scans.last = (weakref.ref(model), kernel, scan)
        return scan.callers

    def _scan(self, model: nn.Module, kernel: Callable[..., Any]) -> _Scan:
        last = getattr(self._scans, "last", None)
        self._scans.last = None
        if last is not None and last[0]() is model and last[1] is kernel:
            return last[2]
        return _Scan(model, kernel)

    def install(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        stack: ExitStack,
        keep: Callable[[str], bool] = lambda name: True,
    ) -> None:
        home, kernel = _flex_module(), _kernel()
        if home is None or kernel is None:
            return
        scan = self._scan(model, kernel)
        session = _FlexSession(model, selected, recorder, keep)
        for name, how in scan.unseen.items():
            module = scan.callers[name]
            why = _UNSEEN.format(how=how)
            warnings.warn(
                f"{name or type(module).__name__} ({type(module).__name__}) {why}", stacklevel=3
            )
            if name in selected:
                session.missed[id(module)] = why
                observe(module, session.observe_missed, stack)

        enlist(_sessions, session, stack)
        _replacement(home, _NAME).hold(stack)
        for namespace, attribute in scan.globals.values():
            _replacement(namespace, attribute).hold(stack)


class _FlexSession(Session):
    def __init__(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        keep: Callable[[str], bool],
    ) -> None:
        super().__init__(model, selected, recorder, keep)
        self.recorded: dict[int, int] = {}  # calls recorded, by module
        self.missed: dict[int, str] = {}  # why a module's calls may be out of sight

    def on_flex(self, callers: Iterable[nn.Module], arguments: dict[str, Any]) -> None:
        found = self.owner(callers)
        if found is None:
            return  # not this model's, or not kept
        module, name = found
        known = self.kinds.get(id(module))
        call = flex_call(arguments, kind=known, own=self.recorder.keep)
        if known is None:
            _warn_if_unsure(name, module, call)
        self.kinds[id(module)] = call.kind
        self.recorder.record(name, call)
        self.recorded[id(module)] = self.recorded.get(id(module), 0) + 1

    def observe_missed(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        """A module that holds flex_attention out of sight: listed in ``attn.skipped`` when
        it ran and nothing was recorded for it."""
        before = self.recorded.get(id(module), 0)
        output = proceed()
        if self.recorded.get(id(module), 0) == before:
            self.recorder.skip(self.names[id(module)], self.missed[id(module)])
        return output


def flex_call(
    arguments: dict[str, Any], *, kind: str | None = None, own: bool = False
) -> AttentionCall:
    """The kind, (batch, query heads, query, key) shape and recompute of one flex_attention
    call, from its arguments by name. ``own``: copy inference-mode query and key (a lazy
    capture; other tensors keep their version counters)."""
    query, key = arguments["query"], arguments["key"]
    score_mod, block_mask = arguments["score_mod"], arguments["block_mask"]
    mask_mod = getattr(block_mask, "mask_mod", None)
    device = query.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if own and (query.is_inference() or key.is_inference()):
        query, key = pool.copies(query, key)
    batch, heads, queries, _ = query.shape
    keys = key.size(-2)
    scale = arguments["scale"]
    if scale is None:
        scale = query.size(-1) ** -0.5
    dtype = _cast(query, autocast).dtype

    def compute(rows: Tensor | None = None) -> Tensor:
        with torch.no_grad(), torch.autocast(device, enabled=False):
            scores = modified_scores(
                _cast(query, autocast), _cast(key, autocast), scale, score_mod, mask_mod, rows
            )
            weights = _softmax(scores, dim=-1)
            hidden = (scores == float("-inf")).all(dim=-1, keepdim=True)
            return weights.masked_fill_(hidden, 0.0).to(dtype)

    if kind is None:
        kind = "self"
        if (score_mod is not None or mask_mod is not None) and queries == keys:
            with torch.no_grad(), torch.autocast(device, enabled=False):
                first = modified_scores(
                    query[:1, :1].new_zeros(1, 1, queries, 1),
                    key[:1, :1].new_zeros(1, 1, keys, 1),
                    1.0,
                    score_mod,
                    mask_mod,
                )
            kind = kind_of(hidden=first[0, 0] == float("-inf"))
    held = (query, key, *_closure_tensors(score_mod, mask_mod))
    return AttentionCall(kind, (batch, heads, queries, keys), dtype, compute, held)


def modified_scores(
    query: Tensor,
    key: Tensor,
    scale: float,
    score_mod: Callable[..., Tensor] | None,
    mask_mod: Callable[..., Tensor] | None,
    rows: Tensor | None = None,
) -> Tensor:
    """``score_mod((q kᵀ) · scale, b, h, q_idx, kv_idx)``, ``-inf`` where ``mask_mod`` is False,
    in flex_attention's working precision, as (batch, query heads, query or rows, key).

    >>> q = torch.ones(1, 1, 2, 4)
    >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    >>> modified_scores(q, q, 0.5, None, causal)
    tensor([[[[2., -inf],
              [2., 2.]]]])
    """
    precision = torch.float64 if query.dtype == torch.float64 else torch.float32
    if key.size(1) != query.size(1):  # grouped-query attention: one map per query head
        key = key.repeat_interleave(query.size(1) // key.size(1), dim=1)
    key = key.expand(query.size(0), *key.shape[1:])
    if rows is not None:
        rows = rows.to(query.device)
        query = query[:, :, rows]
    scores = query.to(precision) @ key.to(precision).transpose(-2, -1)
    scores = (scores * scale).to(precision)
    b, h, _, n = (torch.arange(size, device=scores.device) for size in scores.shape)
    m = torch.arange(scores.size(2), device=scores.device) if rows is None else rows
    with _index_transform():
        if score_mod is not None:
            scores = _vmapped(score_mod, (0,))(scores, b, h, m, n)
        if mask_mod is not None:
            keep = _vmapped(mask_mod, ())(b, h, m, n)
            scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def _vmapped(function: Callable[..., Tensor], prefix: tuple[int, ...]) -> Callable[..., Tensor]:
    """``function`` of scalar (b, h, q_idx, kv_idx) over the whole grid, vmapped as flex does."""
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None)):
        function = torch.vmap(function, in_dims=(*prefix, *dims), out_dims=0)
    return torch.vmap(function, in_dims=(*prefix, 0, None, None, None), out_dims=0)


def _closure_tensors(*functions: Any) -> tuple[Tensor, ...]:
    """Tensors a mod closes over (document ids, a bias table): a lazy capture keeps their
    version counters, so a change in place after the forward raises instead of lying."""
    found: list[Tensor] = []
    for function in functions:
        for cell in getattr(function, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, Tensor) and all(value is not t for t in found):
                found.append(value)
    return tuple(found)


def _index_transform() -> Any:
    """What flex runs its mods under: ``tensor[index_tensor]`` as ``torch.ops.aten.index``."""
    try:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    except ImportError:  # pragma: no cover - other PyTorch versions
        return nullcontext()
    return TransformGetItemToIndex()


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """What autocast makes of a flex input (as ``torch.amp.autocast_mode._cast``)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


__all__ = ["FlexAdapter", "flex_call", "modified_scores"]
