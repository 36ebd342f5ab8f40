"""Adapter for attention that runs through ``torch.nn.functional.scaled_dot_product_attention``.

Design note
-----------
``scaled_dot_product_attention`` is the common funnel: Hugging Face's default ``sdpa``
implementation (BERT, GPT-2, Llama, Mistral, BART, T5 with its position bias as the mask,
ViT, ...), timm's fused attention and many user modules call it, by attribute lookup on
``torch.nn.functional`` at call time. While a capture is active that attribute is a thin
wrapper: it calls the original kernel with the original arguments (the output is the
kernel's own, bit for bit), then recomputes ``softmax(q kᵀ · scale + mask)`` from the same
query, key, mask, ``is_causal``, ``scale`` and ``enable_gqa``.

Attribution: the call belongs to the innermost module of the captured model whose method is
on the Python call stack (the frame's ``self``), found by walking frames only when the kernel
is called, so nothing is hooked on the model and no other op pays for it. Calls from inside
``nn.MultiheadAttention`` are left to the torch.nn adapter.

Attention modules found before the run (leaf-most modules whose class name says attention,
or whose forward calls the kernel or Hugging Face's dispatch) are also observed, to learn
whether a call is cross-attention, to take the weights an eager implementation returns, and to
list in ``attn.skipped`` a module that ran but attended through a kernel attnscope cannot see
(a pre-bound reference, no softmax at all). They are hints, not the rule: a call is recorded
under whichever module of the model makes it, and hand-written attention anywhere is found by
its softmax (``softmax``). What is Hugging Face's own (padding masks, cross-attention
arguments, eager weights, packed heads) is read through ``hf``.

Restored on exit: ``torch.nn.functional.scaled_dot_product_attention`` (when no capture
remains) and the observed modules' ``forward`` attributes.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .. import edits, pool, recompute
from ..attribution import dropout_note
from ..calls import hidden_keys, kind_of
from ..errors import AttnScopeError
from ..intercept import CallingModules, Proceed, Replacement, enlist, observe
from ..padded_rows import blank_rows, blank_rows_, query_padding
from ..recompute import additive_mask, causal_additive_mask, softmax_weights
from . import hf, softmax
from .base import AttentionCall, Recorder, Session

_TORCH_NN_ATTENTION = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


def _says_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return ("attention" in name or "attn" in name) and not isinstance(module, _TORCH_NN_ATTENTION)


def _calls_sdpa(module: nn.Module) -> bool:
    return _source_calls_sdpa(type(module).forward)


@functools.lru_cache(maxsize=1024)
def _source_calls_sdpa(forward: Callable[..., Any]) -> bool:
    """Whether a forward calls sdpa itself, or through Hugging Face's attention dispatch
    (``ALL_ATTENTION_FUNCTIONS``), whatever its class is called (LongCat's ``...MLA``)."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return any(marker in source for marker in _CALLS_ATTENTION)


_CALLS_ATTENTION = ("scaled_dot_product_attention", hf.DISPATCH)


def find_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf-most modules whose class name says attention, and modules whose forward calls sdpa.

    Modules holding PyTorch's own attention are left to the torch.nn adapter. One post-order
    pass over the tree, so large models stay cheap.
    """
    has_torch_nn: dict[int, bool] = {}
    has_inner_attention: dict[int, bool] = {}

    def visit(module: nn.Module) -> tuple[bool, bool]:
        """(holds torch.nn attention, holds a module whose name says attention), self included."""
        key = id(module)
        if key not in has_torch_nn:
            children = [visit(child) for child in module.children()]
            has_torch_nn[key] = isinstance(module, _TORCH_NN_ATTENTION) or any(
                c[0] for c in children
            )
            has_inner_attention[key] = any(c[1] for c in children)
        return has_torch_nn[key], has_inner_attention[key] or _says_attention(module)

    visit(model)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if has_torch_nn[id(module)]:
            continue
        leaf_most = _says_attention(module) and not has_inner_attention[id(module)]
        if leaf_most or _calls_sdpa(module):
            found[name] = module
    return found


class _SdpaArgs:
    """The arguments of one ``scaled_dot_product_attention`` call, by name."""

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> None:
        self.query, self.key, self.value, self.attn_mask = query, key, value, attn_mask
        self.dropout_p = dropout_p
        self.is_causal, self.scale, self.enable_gqa = bool(is_causal), scale, bool(enable_gqa)

    def with_mask(self, mask: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of the same call with ``mask`` as its ``attn_mask`` (not causal)."""
        kwargs: dict[str, Any] = {"attn_mask": mask, "dropout_p": self.dropout_p}
        if self.scale is not None:
            kwargs["scale"] = self.scale
        if self.enable_gqa:
            kwargs["enable_gqa"] = True
        return (self.query, self.key, self.value), kwargs

    def own_inference_tensors(self) -> None:
        """For a lazy capture: copy the query, key and mask when they are inference tensors,
        which keep no version counter, so a later in-place write (a static KV cache under
        ``inference_mode``) could not be caught; other tensors are held as given, guarded by
        theirs (``LazyWeights``)."""
        others = [self.query] + ([] if self.attn_mask is None else [self.attn_mask])
        if not any(t.is_inference() for t in (self.key, *others)):
            return
        # the key in a block of its own: a generation's lazy capture lets each step's go once
        # the next step's begins with it (``LazyWeights.follow``), the query and mask stay
        (self.key,) = pool.copies(self.key)
        copies = pool.copies(*others)
        self.query = copies[0]
        self.attn_mask = copies[1] if len(copies) == 2 else None


# -- the function patch, shared by every active capture --------------------------------------

_sessions: list[_SdpaSession] = []


def _observed_sdpa(*args: Any, **kwargs: Any) -> Tensor:
    thread = threading.get_ident()
    sessions = [session for session in tuple(_sessions) if session.thread == thread]
    edit_sets = edits.active_on_this_thread()
    if not sessions and not edit_sets:
        return _SDPA.call_original(*args, **kwargs)
    callers = CallingModules(sys._getframe(1))
    found = edits.edits_of(edit_sets, callers) if edit_sets else None
    if found is None and len(sessions) == 1 and sessions[0].outputs_from_weights:
        output = sessions[0].on_sdpa(callers, args, kwargs, from_weights=True)
        if output is not None:  # recorded, and its output computed from the weights
            return output
    if found is not None:
        args, kwargs, output, kernel_output = _edited_call(found[0], found[1], args, kwargs)
    else:
        output = kernel_output = _SDPA.call_original(*args, **kwargs)
    if any(session.wants_outputs for session in sessions):
        innermost = next(iter(callers), None)
        if isinstance(innermost, nn.MultiheadAttention):  # recorded after it returns
            _kernel_outputs.value = (innermost, args, kwargs, kernel_output)
    for session in sessions:
        session.on_sdpa(callers, args, kwargs, kernel_output)
    return output


def _edited_call(
    module: nn.Module, chosen: list[edits.Edit], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], Tensor, Tensor]:
    """One sdpa call of an edited module: the mask with the knocked-out edges, then the head
    edits of the kernel's output. Returns the call's arguments as run, the output the model
    gets and the kernel's own output."""
    call = _SdpaArgs(*args, **kwargs)
    name = chosen[0].name
    packed = hf.packed_gqa_groups(module, call.query, call.key)  # (batch, kv heads, groups, d)
    edges = [edge for edit in chosen for edge in edit.edges]
    if edges:
        groups = call.query.size(-2) if packed else 0
        matched: set[tuple[int, int]] = set()
        mask = edits.knock_out(
            name, edges, call.query, call.key, call.attn_mask, call.is_causal, groups, matched
        )
        for edit in chosen:
            edit.matched |= matched & set(edit.edges)
        args, kwargs = call.with_mask(mask)
    kernel_output = _SDPA.call_original(*args, **kwargs)
    output = kernel_output
    head_edits = [edit.heads for edit in chosen if edit.heads is not None]
    if head_edits:
        if output.dim() != 4:
            raise AttnScopeError(
                f"{name!r} calls scaled_dot_product_attention without a heads axis (output "
                f"{tuple(output.shape)}): there is no head to edit"
            )
        batch, kv_heads, groups, dim = output.shape
        if packed:  # one head per (kv head, group): heads first, one query
            output = output.reshape(batch, kv_heads * groups, 1, dim)
        for head_edit in head_edits:
            output = head_edit(module, output)
        if packed:
            output = output.reshape(batch, kv_heads, groups, dim)
    return args, kwargs, output, kernel_output


_kernel_outputs = threading.local()


def _forget_kernel_output() -> None:
    _kernel_outputs.value = None


def take_kernel_output(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The values and output of the last sdpa call ``module`` itself made on this thread (in
    a capture that keeps gradients or norms), once: for the adapter that records ``module``
    after its forward returns (``nn.MultiheadAttention``'s Python path calls sdpa)."""
    last = getattr(_kernel_outputs, "value", None)
    _kernel_outputs.value = None
    if last is None or last[0] is not module:
        return None
    call = _SdpaArgs(*last[1], **last[2])
    return call.value, last[3]


_SDPA = Replacement(F, "scaled_dot_product_attention", _observed_sdpa)


def hold_edits(stack: ExitStack) -> None:
    """Keep the stand-in in place until ``stack`` closes, for ``attnscope.edits`` alone."""
    _SDPA.hold(stack)


def _hold(session: _SdpaSession, stack: ExitStack) -> None:
    enlist(_sessions, session, stack)
    _SDPA.hold(stack)


# -- the adapter ---------------------------------------------------------------------------


class SdpaAdapter:
    """Captures every ``scaled_dot_product_attention`` call, and eager Hugging Face attention."""

    name = "sdpa"
    recognises: tuple[str, ...] = (
        "modules calling torch.nn.functional.scaled_dot_product_attention "
        "(Hugging Face transformers, timm, your own)",
    )

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return find_attention_modules(model)

    def install(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        stack: ExitStack,
        keep: Callable[[str], bool] = lambda name: True,
    ) -> None:
        session = _SdpaSession(model, selected, recorder, keep)
        _warn_of_unseen_calls(model, keep)
        if session.padding_scopes:
            observe(model, session.observe_model, stack)
        for module in selected.values():
            observe(module, session.observe_attention_module, stack)
        _hold(session, stack)
        stack.callback(_forget_kernel_output)  # nothing of the graph kept after the capture
        softmax.hold(session, stack)  # hand-written attention: the model's own softmax


def _warn_of_unseen_calls(model: nn.Module, keep: Callable[[str], bool]) -> None:
    """Warn, naming the module, where a forward calls sdpa through a reference bound before
    the capture (``from torch.nn.functional import scaled_dot_product_attention``): the capture
    replaces the attribute on ``torch.nn.functional``, which such a call never looks up."""
    for name, module in model.named_modules():
        bound = _prebound_sdpa(type(module))
        if bound and keep(name):
            warnings.warn(
                f"{name or type(module).__name__} ({type(module).__name__}) calls "
                f"scaled_dot_product_attention through {bound!r}, a reference bound before the "
                "capture, so attnscope cannot see those calls and records nothing for them. "
                "Call torch.nn.functional.scaled_dot_product_attention (F.scaled_dot_product_"
                "attention) at call time in that module",
                stacklevel=4,
            )


_PREBOUND: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def _prebound_sdpa(cls: type) -> str | None:
    """The global name under which a method of ``cls`` holds PyTorch's sdpa kernel itself."""
    if cls not in _PREBOUND:
        _PREBOUND[cls] = _find_prebound_sdpa(cls)
    return _PREBOUND[cls]


def _find_prebound_sdpa(cls: type) -> str | None:
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        for attribute, value in vars(klass).items():
            function = getattr(value, "__func__", value)
            if function is _SDPA.kernel:  # kept on the class: self.kernel(q, k, v)
                return f"{klass.__name__}.{attribute}"
            code = getattr(function, "__code__", None)
            scope = getattr(function, "__globals__", None)
            if code is None or not isinstance(scope, dict):
                continue
            for global_name in _global_names(code):
                if scope.get(global_name) is _SDPA.kernel:
                    return global_name
    return None


def _global_names(code: Any) -> Iterator[str]:
    yield from code.co_names
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            yield from _global_names(constant)


class _Frame:
    """One running call of an observed attention module."""

    def __init__(self, module: nn.Module, cross: bool, mask: Tensor | None = None) -> None:
        self.module = module
        self.cross = cross
        self.mask = mask  # the 4-D mask an eager implementation was given, if any
        self.recorded = 0  # its sdpa calls: once it made one, no softmax in it is its attention
        self.softmaxes: list[Tensor] = []  # copies of the maps its own softmaxes computed
        self.unmapped: list[str] = []  # the softmaxes it computed that are no map (for skips)
        self.sdpa_seen: list[tuple[Any, ...]] = []  # its sdpa calls' (tensors, versions, flags)
        self.cross_keys: int | None = None  # the length of the other sequence, if it has one
        self.arguments: dict[str, Any] = {}  # its keyword arguments
        self.length: int | None = None  # its input's length, (batch, length, width) states

    def left_out(self) -> str:
        """The softmaxes it computed that are no map, each once, for ``attn.skipped``."""
        return ", ".join(dict.fromkeys(self.unmapped))


class _SdpaSession(Session):
    def __init__(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        keep: Callable[[str], bool],
    ) -> None:
        super().__init__(model, selected, recorder, keep)
        self.running: list[_Frame] = []
        self.padding_scopes = hf.padding_scopes(model, self.names)
        self.paddings: list[tuple[str, Tensor]] = []  # (scope, padding) while the model runs

    @property
    def outputs_from_weights(self) -> bool:
        return bool(getattr(self.recorder, "outputs_from_weights", False))

    def on_sdpa(
        self,
        callers: Iterable[nn.Module],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor | None = None,
        from_weights: bool = False,
    ) -> Tensor | None:
        """Record one sdpa call the kernel answered with ``output``. ``from_weights`` (before
        any kernel ran, for a capture or stream with ``exact_outputs=False``): record it and
        return its output computed from the weights, or return None, having done nothing,
        where that is not a plain call (the kernel then runs and this is called again)."""
        found = self.owner(callers)
        if found is None or isinstance(found[0], nn.MultiheadAttention):
            return None  # not this model's, or left to the torch.nn adapter
        module, name = found
        frame = next((f for f in reversed(self.running) if f.module is module), None)
        call = _SdpaArgs(*args, **kwargs)
        if from_weights and not _plain_math(call):
            return None
        if frame is not None and _repeats(frame, call):
            if not from_weights:  # the same query, key and mask again (DiffLlama): the same map
                frame.recorded += 1
            return None

        def declined() -> None:  # as if never seen: the kernel runs, and this is called again
            if frame is not None:
                frame.sdpa_seen.pop()

        if self.recorder.keep:
            call.own_inference_tensors()
        known = self.kinds.get(id(module))
        batch, keys = call.query.size(0), call.key.size(-2)
        queries = call.query.size(-2)
        cached = known == "causal" or call.is_causal or bool(getattr(module, "is_causal", False))
        padded = (
            self._padded_queries(name, batch, queries, keys, cached)
            if call.query.dim() == 4
            else None
        )
        joint = frame.cross_keys if frame is not None and frame.cross else None
        if joint is not None and 0 < joint < keys:
            if from_weights:
                declined()
                return None
            self._record_joint(name, module, call, keys - joint, padded)
            if frame is not None:
                frame.recorded += 1
            return None
        attention = sdpa_call(
            call,
            module,
            cross=frame is not None and frame.cross,
            kind=known,
            padded_queries=padded,
            output=output,
            from_weights=from_weights,
        )
        result = None
        if from_weights:
            if attention.output is None:  # GQA decoding packed into the queries: no values
                declined()
                return None
            result = attention.output
        if known is None:
            _warn_if_unsure(name, module, attention)
        self.kinds[id(module)] = attention.kind
        self.recorder.record(name, attention)
        if frame is not None:
            frame.recorded += 1
        return result

    def _record_joint(
        self, name: str, module: nn.Module, call: _SdpaArgs, own: int, padded: Tensor | None
    ) -> None:
        """One call over [own keys; the other sequence's keys] (T5Gemma2's merged decoder
        attention): one softmax over both, recorded as its two parts, ``NAME.self`` (the
        decoder's own keys, causal or not as its mask says) and ``NAME.cross``, each the
        columns of the joint weights (rows sum to 1 over both parts together)."""
        whole = sdpa_call(call, module, kind="self", padded_queries=padded)
        hidden = hidden_keys(call.attn_mask)
        own_hidden = None if hidden is None else hidden[..., :own]
        causal = call.is_causal or bool(getattr(module, "is_causal", False))
        parts = (
            ("self", kind_of(causal=causal, hidden=own_hidden), slice(None, own)),
            ("cross", "cross", slice(own, None)),
        )
        batch, heads, queries, keys = whole.shape
        weights = whole.compute  # not the whole call: a lazy part keeps no values, no graph
        for part, kind, columns in parts:
            width = len(range(keys)[columns])

            def compute(rows: Tensor | None = None, columns: slice = columns) -> Tensor:
                return weights(rows)[..., columns]

            shape = (batch, heads, queries, width)
            part_call = AttentionCall(kind, shape, whole.dtype, compute, whole.held)
            self.recorder.record(f"{name}.{part}", part_call)

    def on_softmax(
        self, weights: Tensor, axis: int | None, callers: CallingModules
    ) -> softmax.Finish | None:
        """A softmax over the last axis of a (batch, heads, query, key) tensor, or of a
        (batch * heads, query, key) one (the layout older models multiply with ``bmm``).

        Inside an observed attention module that called no sdpa, a copy is kept as its
        hand-written attention, in case the module returns no weights of its own (see
        ``_record_returned``: weights it returns win, as an eager implementation's exclude a
        sink column its softmax had); any other softmax there is noted, to say why nothing was
        mapped. Anywhere else in the model, whatever the module is called, it is attention if
        the module multiplies something by it: ``softmax`` hands it back then, and it is
        recorded under the innermost module that computed it. A 3-D one is taken only once it
        multiplies something, as only then is it surely attention.
        """
        last = axis is not None and axis == weights.dim() - 1
        frame = self.running[-1] if self.running else None
        if frame is not None:
            running = frame
            if frame.recorded:
                return None
            dense = (
                hf.dense_layout(frame.module, weights, frame.arguments, frame.length)
                if last
                else None
            )
            if dense is not None:
                frame.softmaxes.append(dense)
                return None
            if not last or _heads_first(weights, frame.module) is None:
                # noted if over keys (the last axis, of more than one, of a map-like tensor);
                # a softmax over another axis (a gate, a convolution's kernel) is no map at all
                if last and weights.dim() >= 3 and weights.size(-1) > 1:
                    frame.unmapped.append(f"{tuple(weights.shape)} over axis {axis}")
                return None
            if weights.dim() == 4:
                frame.softmaxes.append(weights.detach().clone())
                return None

            def keep(product: Tensor) -> None:
                maps = _heads_first(product, running.module)
                if maps is not None:
                    running.softmaxes.append(maps.detach().clone())

            return keep
        if not last or weights.dim() not in (3, 4):
            return None
        found = self.owner(callers)
        if found is None or isinstance(found[0], _TORCH_NN_ATTENTION):
            return None
        module, name = found
        if _heads_first(weights, module) is None:
            return None
        given = callers.locals_of(module)
        cross = hf.is_cross(given, module)
        mask = given.get("attention_mask")
        masks = isinstance(mask, Tensor) and (mask.dtype == torch.bool or mask.is_floating_point())

        def finish(product: Tensor) -> None:
            maps = _heads_first(product, module)
            if maps is not None:
                frame = _Frame(module, cross, mask if masks else None)
                self._record_map(name, module, frame, maps.detach().clone(), on_graph=maps)

        return finish

    def _record_map(
        self,
        name: str,
        module: nn.Module,
        frame: _Frame,
        weights: Tensor,
        on_graph: Tensor | None = None,
    ) -> None:
        """Record weights a module computed itself; ``on_graph`` is that very tensor as the
        model multiplied it, whose gradient is ∂L/∂A (``capture(grads=True)``)."""
        kind = self.kinds.get(id(module))
        if kind is None:
            causal = bool(getattr(module, "is_causal", False))
            kind = kind_of(cross=frame.cross, causal=causal, hidden=weights[0, 0] == 0)
            self.kinds[id(module)] = kind
        batch, _, queries, keys = weights.shape
        padded = (
            None
            if kind == "cross"
            else self._padded_queries(name, batch, queries, keys, kind == "causal")
        )
        mask = frame.mask if frame.mask is not None and frame.mask.dim() == 4 else None
        with torch.no_grad():  # nothing of attnscope on the model's graph
            weights = blank_rows(weights.detach(), _hidden_of_computed(weights, mask), padded)
        call = AttentionCall.of_weights(kind, weights)
        if on_graph is not None and on_graph.requires_grad and on_graph.shape == weights.shape:
            call.grad_of = on_graph
        self.recorder.record(name, call)

    def observe_attention_module(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        other = hf.cross_states(module, args, kwargs)
        cross = other is not None or hf.is_cross(kwargs, module)
        mask = kwargs.get("attention_mask")
        frame = _Frame(module, cross, mask if isinstance(mask, Tensor) else None)
        frame.arguments = kwargs
        states = args[0] if args else kwargs.get("hidden_states")
        if isinstance(states, Tensor) and states.dim() == 3:
            frame.length = states.size(1)
        if isinstance(other, Tensor) and other.dim() >= 2:
            frame.cross_keys = other.size(-2)
        before = self.recorder.calls
        self.running.append(frame)
        try:
            output = proceed()
        finally:
            self.running.pop()
        if self.recorder.calls == before:  # no adapter recorded anything while it ran
            self._record_returned(module, output, frame)
        return output

    def _record_returned(self, module: nn.Module, output: Any, frame: _Frame) -> None:
        """An eager implementation returns its weights; anything else cannot be observed."""
        weights = hf.eager_weights(output)
        name = self.names[id(module)]
        before_dropout = (
            module.training
            and weights is not None
            and [w.shape for w in frame.softmaxes] == [weights.shape]
        )
        returned_is_own = (
            weights is not None
            and len(frame.softmaxes) > 1
            and any(s.shape == weights.shape and torch.equal(s, weights) for s in frame.softmaxes)
        )  # it returns one of its own softmaxes: every one of them is a map (several streams)
        if frame.softmaxes and (weights is None or before_dropout or returned_is_own):
            # hand-written and returning nothing, or training (what it returns may be after
            # dropout), or returning one of several: its own softmaxes
            for computed in frame.softmaxes:
                self._record_map(name, module, frame, computed)
            if frame.unmapped:  # what was recorded is not all it computed: say what is missing
                why = _PARTLY.format(cls=type(module).__name__, shapes=frame.left_out())
                self.recorder.skip(name, why)
            return
        if weights is None:
            implementation = hf.implementation(module)
            if implementation in (None, "sdpa", "eager"):
                bound = _prebound_sdpa(type(module))
                if bound:
                    self.recorder.skip(name, _PREBOUND_NOTE.format(name=bound))
                elif frame.unmapped:
                    why = _UNMAPPED.format(cls=type(module).__name__, shapes=frame.left_out())
                    self.recorder.skip(name, why)
                elif _says_attention(module):
                    self.recorder.skip(name, _NO_SOFTMAX.format(cls=type(module).__name__))
                return  # a module found by its source, which did not attend this time
            raise AttnScopeError(
                f"{name} ({type(module).__name__}) ran, but its attention went through a kernel "
                f"attnscope cannot observe (attention implementation: {implementation or 'unknown'}"
                "). Load the model with attn_implementation='sdpa' (the default) or 'eager', or "
                "make the module call torch.nn.functional.scaled_dot_product_attention; if it "
                f"computes no attention, leave it out with capture(model, exclude={name!r})"
            )
        self._record_map(name, module, frame, weights, on_graph=weights)
        if frame.unmapped:  # it returned one map, and computed others that are not
            why = _PARTLY.format(cls=type(module).__name__, shapes=frame.left_out())
            self.recorder.skip(name, why)

    def _padded_queries(
        self, name: str, batch: int, queries: int, keys: int, cached: bool
    ) -> Tensor | None:
        """The model's own word on which of this call's queries are padding (its 2-D
        ``attention_mask``, for the modules it applies to), or None (``query_padding``)."""
        for scope, padding in reversed(self.paddings):
            if not scope or name == scope or name.startswith(scope + "."):
                return query_padding(padding, batch, queries, keys, cached)
        return None

    def observe_model(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        """Note the padding masks the model is called with while it runs."""
        given = hf.given_paddings(module, args, kwargs, self.padding_scopes)
        noted = [(self.padding_scopes[argument], padding) for argument, padding in given.items()]
        self.paddings.extend(noted)
        try:
            return proceed()
        finally:
            del self.paddings[len(self.paddings) - len(noted) :]


def _version(tensor: Tensor | None) -> int | None:
    if tensor is None:
        return None
    try:
        return int(tensor._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def _repeats(frame: _Frame, call: _SdpaArgs) -> bool:
    """Whether this module call already made an sdpa call with the same query, key and mask
    (the same tensors unchanged since, or equal ones: grouped-query keys are expanded afresh
    for each call), flags and scale: its weights are that call's, whatever the values
    (DiffLlama attends twice, over two halves of the values). Only a module's second call in
    one forward pays for the comparison."""
    flags = (call.is_causal, call.scale, call.enable_gqa)
    tensors = (call.query, call.key, call.attn_mask)
    versions = tuple(_version(t) for t in tensors)
    for seen, seen_versions, seen_flags in frame.sdpa_seen:
        if seen_flags == flags and all(
            _same(a, b, va, vb)
            for a, b, va, vb in zip(seen, tensors, seen_versions, versions, strict=True)
        ):
            return True
    frame.sdpa_seen.append((tensors, versions, flags))
    return False


def _same(a: Tensor | None, b: Tensor | None, version_a: int | None, version_b: int | None) -> bool:
    if a is None or b is None:
        return a is b
    if a is b:
        return version_a == version_b
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _warn_if_unsure(name: str, module: nn.Module, call: AttentionCall) -> None:
    """A first call whose queries and keys differ in number, with no sign of cross-attention
    (an argument naming encoder states) and none of a cache (a causal module): the kind is a
    guess, and the user should know which."""
    _, _, queries, keys = call.shape
    if call.kind != "self" or queries == keys:
        return
    warnings.warn(
        f"{name} ({type(module).__name__}): its first call has {queries} queries over {keys} "
        f"keys and no cross-attention argument ({', '.join(hf.CROSS_ARGUMENTS)}), so it is "
        "labelled 'self'. If it attends to another sequence, read it as cross-attention "
        "(attn.kind() says 'self'); if it is a cached self-attention, its rows are the newest "
        "positions",
        stacklevel=5,
    )


def _heads_first(weights: Tensor, module: nn.Module) -> Tensor | None:
    """``weights`` as (batch, heads, query, key), or None where it cannot be one of the
    module's maps: a (batch, heads, ...) softmax without the module's head count, where it
    says one (a router's, or a deformable attention's (batch, query, heads, points)), or a
    3-D one whose first axis is not batch × heads."""
    heads = hf.head_count(module)
    if weights.dim() == 4:
        return weights if heads is None or weights.size(1) == heads else None
    if weights.dim() == 3 and heads is not None and weights.size(0) % heads == 0:
        return weights.view(-1, heads, *weights.shape[1:])
    return None


_PREBOUND_NOTE = (
    "calls scaled_dot_product_attention through {name!r}, a reference bound before the "
    "capture, which attnscope cannot see; call torch.nn.functional.scaled_dot_product_attention "
    "at call time there"
)
_UNMAPPED = (
    "{cls} computed its attention by hand, but its softmax has a layout attnscope does not map "
    "to (batch, heads, query, key): {shapes} (banded, blocked or multi-stream attention, or "
    "attention over another axis); nothing of it is recorded"
)
_PARTLY = (
    "{cls}: its (batch, heads, query, key) weights are recorded, but it also computed "
    "softmaxes of a layout attnscope does not map, left out: {shapes} (global or multi-stream "
    "attention beside a mapped one)"
)
_NO_SOFTMAX = (
    "{cls} computed no softmax over keys (the last axis of a map) and called no attention "
    "kernel attnscope knows (linear, recurrent or kernelised attention, or a kernel of its "
    "own): it has no attention weights to capture"
)


def sdpa_call(
    call: _SdpaArgs,
    module: nn.Module | None = None,
    *,
    cross: bool = False,
    kind: str | None = None,
    padded_queries: Tensor | None = None,
    output: Tensor | None = None,
    from_weights: bool = False,
) -> AttentionCall:
    """The kind, (batch, heads, query, key) shape and recompute of one sdpa call's weights;
    rows as ``padded_rows`` says (``padded_queries``: (batch or 1, query), True at padding).
    With the kernel's ``output``, the call carries it and its values (gradients, norms).
    ``from_weights`` (a call of ``_plain_math``, before any kernel ran): the weights are
    computed now, once, and the call's ``output`` is theirs (``_output_from_weights``)."""
    query, key = call.query, call.key
    if query.dim() == 3:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    if query.dim() != 4:
        raise AttnScopeError(
            f"scaled_dot_product_attention called with {call.query.dim()}-D queries; attnscope "
            "reads (batch, heads, query, dim) or (batch, query, dim)"
        )
    mask = call.attn_mask
    if mask is not None and mask.dim() == 3 and call.query.dim() == 3:
        mask = mask.unsqueeze(1)
    packed = hf.packed_gqa_groups(module, query, key)
    batch, heads, queries, dim = query.shape
    keys = key.size(-2)
    if packed:
        heads, queries = heads * queries, 1
    if kind is None:  # a module's first call: its mask is read for the kind only then
        causal = call.is_causal or bool(getattr(module, "is_causal", False))
        kind = kind_of(cross=cross, causal=causal, hidden=hidden_keys(mask))
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(dim)
    if kind == "cross" or packed:
        padded_queries = None
    weights = _SdpaWeights(query, key, mask, packed, heads, scale, call.is_causal, padded_queries)
    has_values = (not packed and call.value.dim() in (3, 4)) or (packed and output is not None)
    values = _HeadValues(_values_4d(call), heads) if has_values else None
    kernel_output, note = None, None
    if output is not None and call.dropout_p > 0:
        note = dropout_note(call.dropout_p)
    elif output is not None:  # the tensor itself: a hook on a view of it would never fire
        kernel_output = output
    if from_weights and values is not None:
        with torch.no_grad():
            computed, blocked = weights.unblanked()
            kernel_output = _output_from_weights(computed, values(), call.query)
            weights.computed = blank_rows_(computed, blocked, padded_queries)
    return AttentionCall(
        kind,
        (batch, heads, queries, keys),
        query.dtype,
        weights.compute,
        tuple(t for t in (query, key, mask) if t is not None),
        weights.terms,
        values=values,
        output=kernel_output,
        grad_note=note,
        reader=weights,
    )


class _SdpaWeights:
    """One sdpa call's weights, from what it read (queries, keys, mask), as the kernel forms
    them: the ``compute``, ``terms`` and ``values`` of its ``AttentionCall``. One slotted
    object per call rather than a closure each: a lazy capture keeps every call of a
    generation (layers x steps), and each closure and cell is one more object for Python's
    garbage collector to walk (one full collection over a lazy capture's objects cost a
    GPT-2 decoding step more than the rest of its recording did)."""

    __slots__ = (
        "computed",
        "heads",
        "is_causal",
        "key",
        "mask",
        "packed",
        "padded_queries",
        "query",
        "scale",
    )

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        mask: Tensor | None,
        packed: bool,
        heads: int,
        scale: float,
        is_causal: bool,
        padded_queries: Tensor | None,
    ) -> None:
        self.query, self.key, self.mask = query, key, mask  # (batch, heads, ...) each
        self.packed = packed  # one decoding step's query heads in the query axis
        self.heads = heads  # of the weights: query heads x groups where packed
        self.scale, self.is_causal, self.padded_queries = scale, is_causal, padded_queries
        self.computed: Tensor | None = None  # the weights, where computed at the call

    def reading(self, held: tuple[Tensor | None, ...]) -> _SdpaWeights:
        """The same weights from ``held``: query, key and, where the call has one, the mask
        (its ``AttentionCall.held``), of the same values as this call's (``calls.Reader``)."""
        other = _SdpaWeights(
            held[0],  # type: ignore[arg-type]  # None: given again before it is read
            held[1],  # type: ignore[arg-type]
            held[2] if len(held) > 2 else None,
            self.packed,
            self.heads,
            self.scale,
            self.is_causal,
            self.padded_queries,
        )
        other.computed = self.computed
        return other

    def _expanded_keys(self) -> Tensor:
        query, key = self.query, self.key
        if key.size(1) != query.size(1):  # grouped-query attention: one map per query head
            return key.repeat_interleave(query.size(1) // key.size(1), dim=1)
        return key

    def terms(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if self.packed:  # (batch, kv heads, groups, dim): one query per head, keys shared
                batch, _, groups, dim = self.query.shape
                queries = self.query.reshape(batch, self.heads, 1, dim) * self.scale
                return queries, self.key.repeat_interleave(groups, dim=1)
            return self.query * self.scale, self._expanded_keys()

    def unblanked(self, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The weights before the convention's rows are zeroed, and the keys a float mask
        hides at its minimum (rows a bool mask or causality hides are zeros already)."""
        q, k, m = self.query, self._expanded_keys(), self.mask
        keys = k.size(-2)
        if rows is not None and not self.packed:
            q = q[:, :, rows]
            if m is not None and m.size(-2) > 1:
                m = m[..., rows, :]
        # sdpa adds its masks: causality and a bool mask (True = attends) as -inf/0 floats,
        # both where both are given
        additive = m
        if m is not None and m.dtype == torch.bool:
            additive = additive_mask(~m, q.dtype)
        if self.is_causal:
            causal = causal_additive_mask(self.query.size(-2), keys, q.dtype, k.device)
            causal = causal if rows is None else causal[rows]
            additive = causal if additive is None else additive + causal
        weights = softmax_weights(q, k, self.scale, additive)
        if self.packed:
            weights = weights.reshape(self.query.size(0), self.heads, 1, keys)
            return (weights if rows is None else weights[:, :, rows]), None
        return weights, hidden_keys(m) if m is not None and m.is_floating_point() else None

    def compute(self, rows: Tensor | None = None) -> Tensor:
        if self.computed is not None:
            return self.computed if rows is None else self.computed[:, :, rows]
        with torch.no_grad():
            weights, blocked = self.unblanked(rows)
            if self.packed:
                return weights
            # the weights are this call's own, fresh: zeroed in place
            return blank_rows_(weights, blocked, self.padded_queries, rows)


class _HeadValues:
    """One call's per-head values (batch, heads, key, dim), grouped-query values expanded to
    each query head: an ``AttentionCall``'s ``values``, apart from its weights, so that a
    lazy capture, which needs only the weights, lets them go."""

    __slots__ = ("heads", "value")

    def __init__(self, value: Tensor, heads: int) -> None:
        self.value, self.heads = value, heads  # (batch or 1, heads or 1, key, dim)

    def __call__(self) -> Tensor:
        if self.value.size(1) != self.heads:  # grouped-query attention: each head's own values
            return self.value.repeat_interleave(self.heads // self.value.size(1), dim=1)
        return self.value


def _values_4d(call: _SdpaArgs) -> Tensor:
    """The call's values as (batch or 1, heads or 1, key, dim), broadcasting as the kernel
    does: leading dims align from the right, so a 3-D value beside 4-D queries is (heads,
    key, dim), shared by the batch, and beside 3-D queries (batch, key, dim)."""
    value = call.value
    if value.dim() == 4:
        return value
    return value.unsqueeze(1) if call.query.dim() == 3 else value.unsqueeze(0)


def _plain_math(call: _SdpaArgs) -> bool:
    """Whether the kernel's output is ``softmax(q kᵀ · scale + mask) · v`` and nothing else
    that ``_output_from_weights`` could miss: no dropout, 4-D query, key and value (a 3-D
    value broadcasts against the heads), no graph to build, no autocast (the kernel would run
    in its dtype), float32 or float64 throughout (in half precision the kernel accumulates in
    float32, and a product of rounded weights would move the next layers' inputs by more than
    rounding), and a call the kernel itself would take as it stands (values for every key,
    grouped keys only with ``enable_gqa`` and a whole number of query heads per key head, a
    float mask of the query's dtype): any other goes to the kernel, which answers it or
    refuses it with its own message."""
    query, key, value, mask = call.query, call.key, call.value, call.attn_mask
    if call.dropout_p != 0 or not query.dim() == key.dim() == value.dim() == 4:
        return False
    heads, key_heads = query.size(1), key.size(1)
    return (
        not torch.is_grad_enabled()
        and not recompute.autocast_on(query)
        and query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.float64)
        and key.size(-2) == value.size(-2)
        and key_heads == value.size(1)
        and (heads == key_heads or (call.enable_gqa and heads % max(key_heads, 1) == 0))
        and (mask is None or mask.dtype in (torch.bool, query.dtype))
    )


def _output_from_weights(weights: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """``weights · values`` per head, for a call of ``_plain_math``: what a capture or stream
    that accepts outputs to rounding runs instead of the kernel and a recompute beside it. The
    weights are those before the convention zeroes rows (padded queries, rows a float mask
    hides at its minimum), as the kernel has them. The output is laid out as the CPU kernel
    lays out its own, so a caller's ``transpose(1, 2).view(...)`` of it works the same: in the
    query's order of strides where the query is dense with its last dim innermost (a
    permutation of a contiguous tensor), else contiguous."""
    batch, heads, queries, _ = weights.shape
    shape = (batch, heads, queries, values.size(-1))
    strides = query.stride()
    if strides[-1] != 1 or not _dense(query):
        return recompute.matmul(weights, values, out=weights.new_empty(shape))
    order = sorted(range(4), key=lambda dim: -strides[dim])  # outermost first
    output = torch.empty([shape[d] for d in order], dtype=weights.dtype, device=weights.device)
    output = output.permute([order.index(dim) for dim in range(4)])
    return recompute.matmul(weights, values, out=output)


def _dense(tensor: Tensor) -> bool:
    """Whether ``tensor`` covers its storage span without gaps or overlaps (a permutation of
    a contiguous tensor): no broadcast (stride 0) dims, no slices."""
    expected = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.size(dim) == 1:
            continue
        if tensor.stride(dim) != expected:
            return False
        expected *= tensor.size(dim)
    return True


def _hidden_of_computed(weights: Tensor, mask: Tensor | None) -> Tensor | None:
    """The keys a module's own 4-D mask hid from the weights it computed itself. A float mask
    hides at its large negatives; a bool mask where False (sdpa's convention) or where True
    (``masked_fill``'s, as MPT's): whichever leaves the weights nothing at the keys it hides."""
    if (
        mask is None
        or mask.shape[-2:] != weights.shape[-2:]
        or mask.size(0) not in (1, weights.size(0))
    ):
        return None
    hidden = hidden_keys(mask)
    if mask.dtype != torch.bool or hidden is None:
        return hidden
    for candidate in (hidden, ~hidden):
        sees = ~candidate.all(dim=-1, keepdim=True)
        if not bool((weights.masked_fill(~(candidate & sees), 0.0) != 0).any()):
            return candidate
    return None
