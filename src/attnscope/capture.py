"""``attnscope.capture``: record every head's attention weights of an unmodified model.

Design note
-----------
Architecture: ``capture`` asks each adapter (``attnscope.adapters``) for the attention modules
it recognises in the model, applies ``include``/``exclude``, and lets the adapters observe
those modules. Adapters hand every attention computation to the ``_Recorder`` as a shape, a
kind and a ``compute`` callable, so the recorder can refuse (``max_bytes``) before anything is
allocated, and keeps only the selected heads, on the storage device and dtype, detached.

Exactness: the model runs its own forward with its own kernels; adapters recompute weights
beside it, under ``no_grad``, from the tensors the kernel saw, or, where a kernel computes the
weights anyway and asking for them changes no output bit (PyTorch's native CPU attention, an
eager implementation returning them), take the kernel's own. Outputs are bit-identical.

Lifetimes: everything an adapter changes is pushed on one ``ExitStack`` with its undo
(registered before the change), and the stack is closed on every exit: normal, exception or
KeyboardInterrupt. Install and restore run under the capture's ``SignalGuard``, held from the
first line of each (a Ctrl-C arriving meanwhile is delivered right after), and a finalizer
closes the stack if an interrupt lands as ``__exit__`` is entered: nothing remains, whenever
the interrupt comes. Only the calls of the
thread that entered the capture are recorded (``attnscope.intercept``). The ``AttentionMaps``
returned holds tensors only, never the model.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import Adapter, default_adapters
from .attribution import (
    OUTPUT_PROJECTIONS,
    GradSlot,
    check_norms_option,
    output_projection,
    value_norms,
)
from .calls import AttentionCall
from .errors import AttnScopeError
from .filters import NamesFilter, filter_names, matcher
from .intercept import SignalGuard
from .lazy import Grown, LazyWeights, finish
from .maps import AttentionMaps
from .refusals import check_capturable
from .spill import Spill


class _Recorder:
    """Applies the storage options to each attention call and appends it to the maps."""

    def __init__(
        self,
        maps: AttentionMaps,
        heads: Sequence[int] | None,
        rows: Sequence[int] | None,
        to: torch.device,
        dtype: torch.dtype | None,
        max_bytes: int | None,
        lazy: bool,
        spill: Spill | None,
        consume: Consumer | None = None,
        grads: bool = False,
        norms: Mapping[str, str] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.maps = maps
        self.consume = consume
        self.grads = grads
        self.norms = norms
        self.model = model
        self.wants_outputs = grads or norms is not None
        # outputs to rounding accepted (exact_outputs=False): sdpa answered from the weights
        self.outputs_from_weights = False
        self.slots: list[GradSlot] = []
        self.projections: dict[str, nn.Module | None] = {}  # found once per module
        self.heads = None if heads is None else list(heads)
        self.rows = None if rows is None else list(rows)
        self.to = to
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.keep = lazy
        self.spill = spill
        self.bytes = 0
        self.calls = 0
        # per module: its last lazily kept call, and the caches its tensors are read through
        self.last_lazy: dict[str, tuple[LazyWeights, list[Grown | None]]] = {}

    def record(self, name: str, call: AttentionCall) -> None:
        batch, heads, queries, keys = call.shape
        if self.heads is not None:
            bad = [h for h in self.heads if not -heads <= h < heads]
            if bad:
                raise AttnScopeError(
                    f"heads={self.heads}: {name!r} has {heads} heads (0..{heads - 1})"
                )
            heads = len(self.heads)
        rows = None
        if self.rows is not None:
            bad = [r for r in self.rows if not -queries <= r < queries]
            if bad:
                raise AttnScopeError(
                    f"rows={self.rows}: {name!r} has {queries} query positions "
                    f"(0..{queries - 1}, or -{queries}..-1 from the end)"
                )
            rows = torch.tensor([r % queries for r in self.rows], dtype=torch.long)
            queries = rows.numel()
        if self.keep:
            # what the weights read, not the values, output and graph that only gradients
            # and norms read (at record time, below): the adapter's call itself is left whole
            kept = dataclasses.replace(call, values=None, output=None, grad_of=None)
            lazy = LazyWeights(name, kept, self.heads, rows, self.to, self.dtype)
            last, grown = self.last_lazy.get(name, (None, []))
            counting = self.max_bytes is not None
            freed = 0 if last is None else last.follow(lazy, grown, counting)  # a KV cache grew
            self.last_lazy[name] = (lazy, grown)
            weights: Tensor | LazyWeights = lazy
            # only max_bytes reads it: summing the spans was half a lazy record's time
            estimate = 0 if self.max_bytes is None else lazy.nbytes - freed
        else:
            estimate = batch * heads * queries * keys * (self.dtype or call.dtype).itemsize
        if self.max_bytes is not None and self.bytes + estimate > self.max_bytes:
            raise AttnScopeError(
                f"capture refused before allocating: {name!r} needs {estimate:,} bytes "
                f"({batch}x{heads}x{queries}x{keys} {self.dtype or call.dtype}), {self.bytes:,} "
                f"are held already, max_bytes={self.max_bytes:,}. Raise max_bytes, capture fewer "
                "modules (include=/exclude=), heads (heads=) or query rows (rows=), store a "
                "smaller dtype, or capture lazily (lazy=True) or to disk (spill=DIR)."
            )
        if self.consume is not None:  # streamed: handed over as the call finishes, never kept
            self.consume(name, call.kind, finish(call.compute(rows), self.heads, self.to, None))
            self.calls += 1
            return
        if not self.keep:
            weights = finish(call.compute(rows), self.heads, self.to, self.dtype)
            if self.spill is not None:
                weights = self.spill.write(name, call.kind, weights)
                estimate = 0  # on disk, mapped: not memory the capture holds
        self.bytes += estimate
        self.maps._append(name, call.kind, weights, rows=self.rows)
        if self.grads:
            self.maps._grads.setdefault(name, []).append(self._slot(name, call, rows))
        if self.norms is not None:
            self.maps._norms.setdefault(name, []).append(self._value_norms(name, call))
        self.calls += 1

    def _slot(self, name: str, call: AttentionCall, rows: Tensor | None) -> GradSlot:
        heads, to, dtype = self.heads, self.to, self.dtype

        def select(grad: Tensor) -> Tensor:
            return finish(grad if rows is None else grad[:, :, rows], heads, to, dtype)

        values = None if call.values is None else call.values()
        slot = GradSlot(name, values, call.output, call.grad_of, call.grad_note)
        slot.select = select
        self.slots.append(slot)
        return slot

    def _value_norms(self, name: str, call: AttentionCall) -> Tensor | str:
        """‖f_h(x_j)‖ (batch, heads, key) of this call, or why there is none."""
        if call.values is None:
            return "its adapter gives no values for it (only its weights)"
        assert self.model is not None and self.norms is not None
        if name not in self.projections:
            self.projections[name] = output_projection(self.model, name, self.norms)
        projection = self.projections[name]
        if projection is None:
            return (
                "no output projection was found (looked for "
                f"{', '.join(OUTPUT_PROJECTIONS)}, and output.dense beside it); name it: "
                f"capture(model, norms={{{name!r}: 'path.to.projection'}})"
            )
        try:
            vector = value_norms(call.values(), projection, name)
        except AttnScopeError as error:  # kept: the weights are fine, say it when read
            return str(error).removeprefix("norms: ")
        if self.heads is not None:
            vector = vector[:, self.heads]
        return vector.to(device=self.to, dtype=self.dtype or vector.dtype)

    def close(self) -> None:
        """Remove every hook a gradient slot put on the graph: nothing stays after the block."""
        for slot in self.slots:
            slot.remove()

    def skip(self, name: str, why: str) -> None:
        self.maps._skip(name, why)


class Capture:
    """The context of one capture: ``with attnscope.capture(model) as attn:``. Used once."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        self._model = model
        self._options = options
        self._guard = SignalGuard()
        self._close: weakref.finalize | None = None
        self._used = False
        self._found_before = True

    def __enter__(self) -> AttentionMaps:
        if self._used:
            raise AttnScopeError(
                "this capture was entered already: a capture records one `with` block; call "
                "attnscope.capture(model) again for another"
            )
        self._used = True
        found, recorder = _prepare(self._model, **self._options)
        self._recorder = recorder
        self._adapters = [adapter for adapter, _, _ in found]
        self._found_before = any(modules for _, modules, _ in found)
        guard, stack = self._guard, ExitStack()
        # the backstop, for an interrupt landing as __exit__ is entered, before its first line:
        # the stack is closed when this object goes (at once, by reference count)
        self._close = weakref.finalize(self, _restore, stack, guard)
        stack.callback(recorder.close)
        guard.held = True  # before the stand-ins go in: one may run as soon as it is in
        try:
            guard.install()
            for adapter, modules, keep in found:
                adapter.install(self._model, modules, recorder, stack, keep)
        except BaseException:
            self._close()
            raise
        try:
            while guard.arrived:  # signals during the install: their handlers run now; one
                guard.deliver()  # that raises (Ctrl-C) ends the capture before it starts
        except BaseException:
            self._close()  # still held: a second one waits too
            raise
        guard.held = False  # no call since the check above: nothing arrived in between
        return recorder.maps

    def __exit__(self, *exc_info: object) -> None:
        self._guard.held = True  # first: no call before it, so no signal handler runs first
        if self._close is not None:
            self._close()
        self._guard.deliver()
        if exc_info[0] is None and not self._found_before:
            maps = self._recorder.maps
            if (
                not self._recorder.calls and not maps.skipped
            ):  # nothing found before, nor while it ran
                raise AttnScopeError(
                    _nothing_found(self._model, self._adapters)
                    + ". Nothing ran in the block that looked like attention"
                )


def _restore(stack: ExitStack, guard: SignalGuard) -> None:
    guard.held = True
    try:
        stack.close()
    finally:
        guard.uninstall()


def capture(
    model: nn.Module,
    *,
    include: NamesFilter | None = None,
    exclude: NamesFilter | None = None,
    heads: Sequence[int] | None = None,
    to: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    rows: Sequence[int] | None = None,
    lazy: bool = False,
    spill: str | os.PathLike[str] | None = None,
    adapters: Sequence[Adapter] = (),
    grads: bool = False,
    norms: bool | Mapping[str, str] = False,
    exact_outputs: bool = True,
) -> Capture:
    """Record per-head attention weights of every attention module ``model`` calls.

    Works in any mode (train, eval, ``no_grad``, ``inference_mode``, autocast); the model's
    output is bit-identical to an uncaptured call, and PyTorch's fused encoder path stays on.
    Weights are (batch, heads, query, key), before dropout; rows of padded or fully masked
    queries are zeros. Only calls on the thread that entered the capture are recorded.

    Memory: ``include``/``exclude``, ``heads`` and ``rows`` (query positions, negative from the
    end: ``rows=[0]`` for CLS, ``rows=[-1]`` for the last token) select at capture time, and
    ``dtype``/``to`` apply as each module finishes. ``lazy=True`` keeps the queries, keys and
    masks the kernels computed or saw (for PyTorch's fused layers, where smaller, copies of the
    input and of the q/k projection) instead of the weights and computes weights when read;
    ``spill="DIR"`` writes each call to disk as it is computed and maps it back.

    ``adapters=[...]`` are asked before the registered ones (``attnscope.register_adapter``)
    for the attention modules they know; modules that ran but whose attention could not be
    mapped are listed, with the reason, in ``attn.skipped``.

    ``grads=True``: a backward inside the block records ∂loss/∂A of every captured call,
    ``attn.grad(name)`` (shaped like ``attn[name]``). ``norms=True``: ``attn.norms(name)`` is
    A_ij·‖f_h(x_j)‖, the weights times the norm of what each key's value adds to the output
    through the head's slice of the output projection (Kobayashi et al. 2020); the projection
    is found by name (``o_proj``, ``out_proj``, ``c_proj``, ``dense``, ...), or given as
    ``norms={module: projection}``. See ``attnscope.attribution``.

    ``exact_outputs=False`` trades the bit-identical output for eager's cost: each plain
    float32/float64 ``scaled_dot_product_attention`` call (no gradients, autocast, dropout,
    ``heads=``, ``rows=``, ``norms=``, ``max_bytes=`` or ``lazy=``) is answered with the
    weights it records times its values, as an eager implementation computes it, instead of
    the kernel and a recompute of the weights beside it. The model's outputs then equal its
    plain ones to rounding, and the weights are exactly those the forward used; every other
    call (``nn.MultiheadAttention``'s and PyTorch's fused layers' included) runs its kernel.

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(16, 4, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    >>> with torch.no_grad(), capture(model) as attn:
    ...     out = model(torch.randn(2, 5, 16))
    >>> attn.names
    ['layers.0.self_attn', 'layers.1.self_attn']
    >>> tuple(attn["layers.0.self_attn"].shape), attn.kind("layers.0.self_attn")
    ((2, 4, 5, 5), 'self')
    """
    options = {
        "include": include,
        "exclude": exclude,
        "heads": heads,
        "to": to,
        "dtype": dtype,
        "max_bytes": max_bytes,
        "rows": rows,
        "lazy": lazy,
        "spill": spill,
        "adapters": adapters,
        "grads": grads,
        "norms": norms,
        "exact_outputs": exact_outputs,
    }
    return Capture(model, options)


Consumer = Callable[[str, str, Tensor], None]


def stream(
    model: nn.Module,
    consume: Consumer,
    *,
    include: NamesFilter | None = None,
    exclude: NamesFilter | None = None,
    heads: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    adapters: Sequence[Adapter] = (),
    exact_outputs: bool = True,
) -> Capture:
    """A capture that keeps nothing: each call's weights go to ``consume(name, kind,
    weights)`` as the call finishes (exactly the tensor a capture would store, detached, on
    the CPU, in the kernel's dtype) and are dropped when it returns. What ``attnscope.scan``
    builds its statistics on; the ``AttentionMaps`` it yields stays empty but for ``skipped``.

    ``exact_outputs=False``, for a consumer that never reads the model's output: where the
    weights of a ``scaled_dot_product_attention`` call are all computed anyway (no ``heads=``
    or ``rows=``, no gradients), the call's output is those weights times its values instead
    of a second pass by the kernel, so the model's outputs equal its plain ones to rounding,
    not bit for bit. The weights streamed are then exactly those the forward used.

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(16, 4, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    >>> seen = []
    >>> with torch.no_grad(), stream(model, lambda n, k, w: seen.append((n, tuple(w.shape)))):
    ...     out = model(torch.randn(2, 5, 16))
    >>> seen
    [('layers.0.self_attn', (2, 4, 5, 5)), ('layers.1.self_attn', (2, 4, 5, 5))]
    """
    if not callable(consume):
        raise AttnScopeError(
            f"stream() takes a callable consume(name, kind, weights), got {consume!r}"
        )
    options: dict[str, Any] = {
        "include": include,
        "exclude": exclude,
        "heads": heads,
        "to": "cpu",
        "dtype": None,
        "max_bytes": None,
        "rows": rows,
        "lazy": False,
        "spill": None,
        "adapters": adapters,
        "consume": consume,
        "exact_outputs": exact_outputs,
    }
    return Capture(model, options)


def _prepare(
    model: nn.Module,
    *,
    include: NamesFilter | None,
    exclude: NamesFilter | None,
    heads: Sequence[int] | None,
    to: str | torch.device,
    dtype: torch.dtype | None,
    max_bytes: int | None,
    rows: Sequence[int] | None,
    lazy: bool,
    spill: str | os.PathLike[str] | None,
    adapters: Sequence[Adapter],
    consume: Consumer | None = None,
    grads: bool = False,
    norms: object = False,
    exact_outputs: bool = True,
) -> tuple[list[tuple[Adapter, dict[str, nn.Module], Callable[[str], bool]]], _Recorder]:
    """Check the options and the model; find the attention modules each adapter observes."""
    if not isinstance(model, nn.Module):
        raise AttnScopeError(
            f"capture() takes a torch.nn.Module, got {type(model).__name__}; pass the model "
            "itself: `with attnscope.capture(model) as attn: model(inputs)`"
        )
    check_capturable(model)
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise AttnScopeError(
            f"adapters= takes a list of adapters, got {type(adapters).__name__}; e.g. "
            "capture(model, adapters=[MyAdapter()])"
        )
    adapters = default_adapters(adapters)
    found: list[tuple[Adapter, dict[str, nn.Module]]] = []
    seen: set[int] = set()
    for adapter in adapters:
        modules = {n: m for n, m in adapter.attention_modules(model).items() if id(m) not in seen}
        seen.update(id(m) for m in modules.values())
        found.append((adapter, modules))
    available = [name for _, modules in found for name in modules]
    if not available and _only_torch_modules(model):
        raise AttnScopeError(_nothing_found(model, adapters))
    if lazy and spill is not None:
        raise AttnScopeError("lazy=True and spill= exclude each other: choose one")
    if not isinstance(grads, bool):
        raise AttnScopeError(f"grads= takes True or False, got {grads!r}")
    if not isinstance(exact_outputs, bool):
        raise AttnScopeError(f"exact_outputs= takes True or False, got {exact_outputs!r}")
    if lazy and not exact_outputs:
        raise AttnScopeError(
            "lazy=True and exact_outputs=False exclude each other: a lazy capture computes "
            "no weights while the model runs, so none can answer its calls; choose one"
        )
    selected = set(_select(model, available, include, exclude))
    keep_include = matcher(include) if include is not None else None
    drop = matcher(exclude) if exclude is not None else None

    claimed: dict[int, set[str]] = {
        id(adapter): {n for other, modules in found if other is not adapter for n in modules}
        for adapter, _ in found
    }

    def keeper(adapter: Adapter) -> Callable[[str], bool]:
        others = claimed[id(adapter)]

        def keep(name: str) -> bool:  # attention found at run time (any module calling sdpa)
            selected_by_user = keep_include is None or keep_include(name)
            return selected_by_user and not (drop and drop(name)) and name not in others

        return keep

    recorder = _Recorder(
        AttentionMaps(),
        _check_indices(heads, "heads", "head indices"),
        _check_indices(rows, "rows", "query positions"),
        _check_device(to),
        _check_dtype(dtype),
        _check_max_bytes(max_bytes),
        bool(lazy),
        None if spill is None else Spill(spill),
        consume,
        bool(grads),
        check_norms_option(norms),
        model,
    )
    recorder.outputs_from_weights = (
        not exact_outputs
        and recorder.heads is None
        and recorder.rows is None
        and not recorder.wants_outputs
        and recorder.max_bytes is None  # its refusal comes before any map is computed
    )
    chosen = [
        (a, {n: m for n, m in modules.items() if n in selected}, keeper(a)) for a, modules in found
    ]
    return chosen, recorder


def _only_torch_modules(model: nn.Module) -> bool:
    """Whether every module of ``model`` is one of PyTorch's own: then nothing in it can
    compute attention that no adapter found (no module of its own runs a softmax by hand)."""
    return all(type(m).__module__.startswith("torch.") for m in model.modules())


def _nothing_found(model: nn.Module, adapters: Sequence[Adapter]) -> str:
    recognised = ", ".join(r for a in adapters for r in a.recognises)
    return (
        f"found no attention module in {type(model).__name__}; attnscope recognises "
        f"{recognised}, and hand-written attention (a softmax over (batch, heads, query, key) "
        "scores that multiplies the values). If your model computes attention another way, "
        "bring your own weights with attnscope.AttentionMaps.from_tensors(...) or write an "
        "adapter (attnscope.register_adapter)"
    )


def _select(
    model: nn.Module,
    available: list[str],
    include: NamesFilter | None,
    exclude: NamesFilter | None,
) -> list[str]:
    """The modules found before the run that ``include``/``exclude`` keep. An ``include`` that
    names none of them but names modules of the model is kept for the run: attention found by
    what runs (hand-written, or a kernel called from an unexpected module) may be there."""
    if not available:
        return []
    try:
        return filter_names(available, include, exclude)
    except AttnScopeError:
        if include is None or not any(map(matcher(include), _names(model))):
            raise
        return [n for n in available if matcher(include)(n)]


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def _check_indices(values: Sequence[int] | None, option: str, what: str) -> Sequence[int] | None:
    if values is None:
        return None
    if isinstance(values, int):
        values = [values]
    values = list(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise AttnScopeError(f"{option} must be a non-empty list of {what}, got {values!r}")
    return values


def _check_device(to: str | torch.device) -> torch.device:
    try:
        device = torch.device(to)
    except (RuntimeError, TypeError) as error:
        raise AttnScopeError(
            f"to={to!r} is not a torch device (e.g. 'cpu', 'cuda:0'): {error}"
        ) from None
    if device.type == "meta":
        raise AttnScopeError("to='meta' would keep shapes only, not weights; use 'cpu' or a GPU")
    try:  # before the forward, not at its first attention call
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise AttnScopeError(
            f"to={to!r}: that device is not available here ({error}); store on 'cpu' or on "
            "a device this machine has"
        ) from None
    return device


STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d) for d in STORAGE_DTYPES)
        raise AttnScopeError(
            f"dtype={dtype!r} cannot hold attention weights; use one of {names} (or None for "
            "the dtype the model computes in)"
        )
    return dtype


def _check_max_bytes(max_bytes: int | None) -> int | None:
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise AttnScopeError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    return max_bytes
