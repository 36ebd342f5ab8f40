"""The one way attnscope changes anything: observing a module, replacing a function.

Design note
-----------
Observing a module. ``nn.TransformerEncoderLayer`` gives up its fused kernel as soon as any
forward hook or pre-hook sits on it or on one of its submodules, and global module hooks never
see keyword arguments, where ``nn.Transformer*`` pass every mask. So a module is observed by
giving it an instance attribute ``forward`` (looked up before the class's method by
``Module.__call__``) that calls the module's own forward unchanged, wrapped in the observers'
"around" functions. The fused-path checks read hook dictionaries, never ``forward``.

Replacing a function. PyTorch's kernels (``F.scaled_dot_product_attention``,
``torch._native_multi_head_attention``, ...) are looked up by attribute at call time, so while
a capture wants them they are thin wrappers (``Replacement``), installed once however many
captures hold them and restored when the last one lets go.

Lifetimes, whatever the order and whatever the exit:

- one wrapper per module or function, reference counted; the last holder restores what was
  there before (a user's own instance ``forward`` included), so captures may end in any order;
  a function is restored only if it is still ours: whoever replaced it meanwhile keeps theirs,
  which still reaches the original through ours (``call_original`` is re-entrancy safe);
- threads: an observer and a function's users belong to the thread that opened the capture;
  calls on other threads run as if nothing were installed;
- copies: ``copy.deepcopy`` (``AveragedModel``, EMA copies) and pickling (``torch.save``) of an
  observed module give an unobserved model that runs its own weights;
- interrupts: every undo is registered before the change it undoes, every undo is idempotent,
  and a ``SignalGuard`` holds back KeyboardInterrupt (any Python signal handler) while an
  install or a restore runs, delivering it right after.
"""

from __future__ import annotations

import copy
import functools
import signal
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol, cast

import torch
from torch import nn

from .errors import AttnScopeError

Proceed = Callable[[], Any]

# -- interrupts ------------------------------------------------------------------------------

_SIGNALS = tuple(signal.valid_signals())


class SignalGuard:
    """Stand-ins for the Python signal handlers (KeyboardInterrupt's included), in place for as
    long as the guard is installed: while ``held`` is set they note what arrives, otherwise
    they pass it straight to the real handler.

    Python runs signal handlers in the main thread between bytecodes, even on the first line of
    a function, so "defer from now on" cannot be said in time by calling something; setting an
    attribute can. A capture installs the guard as it starts and holds it across its install
    and its restore; the with-body in between runs with the real handlers' behaviour. Off the
    main thread no handler can run, and the guard does nothing.

    >>> guard = SignalGuard().install()
    >>> guard.held = True
    >>> signal.raise_signal(signal.SIGINT)  # noted, not raised
    >>> guard.uninstall()  # the real handlers back, nothing held any more
    >>> try:
    ...     guard.deliver()
    ... except KeyboardInterrupt:
    ...     print("delivered after")
    delivered after
    """

    def __init__(self) -> None:
        self.held = False
        self.done = False  # uninstalled: a stand-in still in place only passes signals on
        self.arrived: list[int] = []
        self.saved: dict[int, Any] = {}
        self.handler = self._handle  # one bound method, to know it again

    def _handle(self, signum: int, frame: Any) -> None:
        if self.held:
            self.arrived.append(signum)
        else:
            _deliver(self.saved.get(signum), signum, frame)

    def install(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):  # saved before the stand-in goes in: it may run at once
                    self.saved[signum] = handler
                    signal.signal(signum, self.handler)
        return self

    def uninstall(self) -> None:
        """Put the real handlers back where the stand-ins still are (someone who installed a
        handler of their own meanwhile keeps it), then stop holding. SIGINT goes back last:
        a Ctrl-C meanwhile is held. A signal whose real handler is back already raises there:
        the rest is put back before it goes on."""
        try:
            self._put_back()
        except BaseException:  # a real handler, back already, raised: finish, then let it go
            self._put_back()
            raise
        finally:
            self.held = False

    def _put_back(self) -> None:
        self.done = True
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the stand-ins now pass signals on
        for signum in sorted(self.saved, key=lambda number: number == signal.SIGINT):
            if signal.getsignal(signum) == self.handler:
                signal.signal(signum, _real_handler(self.saved[signum], signum))

    def deliver(self) -> None:
        """Run the real handlers for what arrived while held (KeyboardInterrupt raises here)."""
        arrived, self.arrived = self.arrived, []
        for signum in arrived:
            _deliver(self.saved.get(signum), signum, sys._getframe())


def _real_handler(handler: Any, signum: int) -> Any:
    """``handler``, or, where it is the stand-in of a guard already done (two captures ended
    out of order), what that one stood for."""
    guard = getattr(handler, "__self__", None)
    while isinstance(guard, SignalGuard) and guard.done and handler == guard.handler:
        handler = guard.saved.get(signum, signal.SIG_DFL)
        guard = getattr(handler, "__self__", None)
    return handler


def _deliver(handler: Any, signum: int, frame: Any) -> None:
    if callable(handler):
        handler(signum, frame)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """Hold back signal handlers while the body runs (``SignalGuard``); deliver after.

    >>> with uninterruptible():
    ...     done = True
    >>> done
    True
    """
    guard = SignalGuard()
    guard.held = True  # before the stand-ins go in: one may run as soon as it is in
    try:
        guard.install()
        yield
    finally:
        guard.uninstall()
    guard.deliver()


# -- observing modules -----------------------------------------------------------------------


class Observer(Protocol):
    """Called around a module's forward: must call ``proceed()`` once and return its result."""

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any: ...


_MISSING = object()


class ObservedForward:
    """The instance ``forward`` of an observed module: its own forward, wrapped in observers.

    It copies and pickles as the module's own forward (what ``forward`` was before any capture),
    so a clone of an observed model is an ordinary model of its own.
    """

    def __init__(self, module: nn.Module) -> None:
        self.previous = module.__dict__.get("forward", _MISSING)
        self.original = module.forward
        self.module = weakref.ref(module)
        self.observers: list[tuple[int, Observer]] = []  # (thread, observer)
        functools.update_wrapper(self, self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = self.module()
        thread = threading.get_ident()
        observers = tuple(o for t, o in self.observers if t == thread)
        if target is None or not observers:
            return self.original(*args, **kwargs)
        refuse_under_compile(target)
        return _call_chain(target, observers, self.original, args, kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if self.previous is not _MISSING:
            return copy.deepcopy(self.previous, memo)
        module = self.module()
        clone = memo.get(id(module)) if module is not None else None
        if clone is None:  # copied on its own, not as part of its module
            return self.original
        return types.MethodType(type(clone).forward, clone)

    def __reduce__(self) -> Any:
        if self.previous is not _MISSING:
            return (_identity, (self.previous,))
        # unpickled while its module is rebuilt: the class's forward of the new module
        return (getattr, (self.module(), "forward"))


def _identity(value: Any) -> Any:
    return value


def refuse_under_compile(module: nn.Module) -> None:
    """Raise when an observed module runs inside ``torch.compile``d code: Dynamo would split its
    graph at every observer (measured: the output's bits change), so the capture would not see
    the model the user compiled. Checked before the module's forward runs."""
    if _compiling():
        raise AttnScopeError(
            f"{type(module).__name__} ran under torch.compile inside a capture: a capture "
            "observes eager code, and compiled code around it would run differently. Run the "
            "uncompiled model inside the capture (for torch.compile(model), the same module "
            "and weights are compiled._orig_mod) and keep the compiled one for other calls"
        )


def _no_frame_callback() -> None:  # pragma: no cover - older PyTorch
    return None


try:  # the frame callback is set while compiled code runs (its graph breaks included)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback
except ImportError:  # pragma: no cover - older PyTorch
    get_eval_frame_callback = _no_frame_callback
_frame_callback: Callable[[], object] = get_eval_frame_callback


def _compiling() -> bool:
    """Whether compiled code runs now (imported once: an import per module call cost more
    than the check)."""
    if torch.compiler.is_compiling():
        return True
    return _frame_callback() not in (None, False)


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


_observed: weakref.WeakKeyDictionary[nn.Module, ObservedForward] = weakref.WeakKeyDictionary()
_observe_lock = threading.Lock()


class ObserverHandle:
    """One observer of one module, for the thread that made it. ``attach`` starts it;
    ``remove`` (idempotent) ends it, and the last one removed restores the module's
    ``forward``."""

    def __init__(self, module: nn.Module, observer: Observer) -> None:
        self._module = weakref.ref(module)
        self._entry = (threading.get_ident(), observer)
        self._removed = False

    def attach(self) -> ObserverHandle:
        module = self._module()
        if module is None or self._removed:
            return self
        with _observe_lock:
            found = _observed.get(module)
            wrapper: ObservedForward
            if isinstance(found, ObservedForward) and module.__dict__.get("forward") is found:
                wrapper = cast(ObservedForward, found)
            else:  # none yet, or someone put their own forward over ours: wrap that
                wrapper = ObservedForward(module)
                _observed[module] = wrapper
                module.__dict__["forward"] = wrapper
            wrapper.observers.append(self._entry)
        return self

    def remove(self) -> None:
        module = self._module()
        with _observe_lock:
            found = None if module is None else _observed.get(module)
            if (
                module is not None
                and isinstance(found, ObservedForward)
                and self._entry in found.observers
            ):
                wrapper = found
                wrapper.observers.remove(self._entry)
                if not wrapper.observers:
                    if module.__dict__.get("forward") is wrapper:
                        if wrapper.previous is _MISSING:
                            module.__dict__.pop("forward", None)
                        else:
                            module.__dict__["forward"] = wrapper.previous
                    del _observed[module]
            self._removed = True


def observe(
    module: nn.Module, observer: Observer, stack: ExitStack | None = None
) -> ObserverHandle:
    """Run ``observer`` around every call of ``module`` on this thread until the handle is
    removed (with ``stack``: when it closes; the undo is registered before the change).

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
    handle = ObserverHandle(module, observer)
    if stack is not None:
        stack.callback(handle.remove)
    return handle.attach()


def is_observed(module: nn.Module) -> bool:
    """Whether any capture currently observes ``module``."""
    return module in _observed


# -- attributing a call to the module that made it -------------------------------------------


class CallingModules:
    """The modules whose methods are on the Python stack above ``frame`` (each frame's ``self``
    argument), innermost first, read lazily: a caller looking for the first module of its model
    stops there, however deep the stack. ``locals_of(module)`` is that module's frame's local
    variables (its forward's arguments), read while the frame still runs.

    >>> class Inner(nn.Module):
    ...     def forward(self, x):
    ...         return [type(m).__name__ for m in CallingModules(sys._getframe())]
    >>> class Outer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inner = Inner()
    ...     def forward(self, x):
    ...         return self.inner(x)
    >>> Outer()(None)[:2]
    ['Inner', 'Outer']
    """

    def __init__(self, frame: Any) -> None:
        self._frame = frame
        self._found: list[nn.Module] = []
        self._frames: dict[int, Any] = {}

    def __iter__(self) -> Iterator[nn.Module]:
        yield from self._found
        while self._frame is not None:
            frame, self._frame = self._frame, self._frame.f_back
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module) and (
                    not self._found or self._found[-1] is not owner
                ):
                    self._found.append(owner)
                    self._frames[id(owner)] = frame
                    yield owner

    def locals_of(self, module: nn.Module) -> dict[str, Any]:
        """The innermost running method's locals of ``module`` (found by iterating first)."""
        frame = self._frames.get(id(module))
        return {} if frame is None else dict(frame.f_locals)


# -- replacing functions ---------------------------------------------------------------------


class Replacement:
    """``namespace.attribute`` replaced by a wrapper calling ``handler`` while anyone holds it
    (``hold``).

    ``original`` is what the wrapper replaced when it went in (PyTorch's function, or whatever
    someone installed before); ``kernel`` is the function found at import. ``handler`` reaches
    the original through ``call_original``; a wrapper called again inside that call goes
    straight to ``kernel`` (another patch put on top of ours and restored out of order leaves
    ours on both sides of it, which would otherwise go round and round).

    >>> import math
    >>> class Space:
    ...     sqrt = staticmethod(math.sqrt)
    >>> seen = []
    >>> def spy(x):
    ...     seen.append(x)
    ...     return floor.call_original(x)
    >>> floor = Replacement(Space, "sqrt", spy)
    >>> with ExitStack() as stack:
    ...     floor.hold(stack)
    ...     Space.sqrt(4.0)
    2.0
    >>> seen, Space.sqrt is math.sqrt
    ([4.0], True)
    """

    def __init__(self, namespace: Any, attribute: str, handler: Callable[..., Any]) -> None:
        self.namespace, self.attribute = namespace, attribute
        self.kernel: Callable[..., Any] = getattr(namespace, attribute)
        self.original: Callable[..., Any] = self.kernel
        self._holders = 0
        self._inherited = False  # the attribute came from a base class (Tensor.softmax)
        self._lock = threading.Lock()
        self._inside = threading.local()

        @functools.wraps(self.kernel)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, "active", False):  # called again inside our own call
                return self.kernel(*args, **kwargs)
            return handler(*args, **kwargs)

        self.wrapper = wrapper

    @property
    def replaces_kernel(self) -> bool:
        """Whether the wrapper stands in front of PyTorch's own function (nobody else's)."""
        return self.original is self.kernel

    def hold(self, stack: ExitStack) -> None:
        """Install the wrapper (once, however many holders) until ``stack`` closes."""
        held = [False]

        def release() -> None:
            with self._lock:
                if not held[0]:
                    return
                if self._holders == 1 and getattr(self.namespace, self.attribute) is self.wrapper:
                    if self._inherited:  # it was a base class's: let that show through again
                        delattr(self.namespace, self.attribute)
                    else:
                        setattr(self.namespace, self.attribute, self.original)
                self._holders -= 1
                held[0] = False

        stack.callback(release)  # before the change it undoes
        with self._lock:
            if self._holders == 0 and getattr(self.namespace, self.attribute) is not self.wrapper:
                self.original = getattr(self.namespace, self.attribute)
                self._inherited = self.attribute not in vars(self.namespace)
                setattr(self.namespace, self.attribute, self.wrapper)
            self._holders += 1
            held[0] = True

    def call_original(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._inside, "active", False):
            return self.kernel(*args, **kwargs)
        try:
            self._inside.active = True
            return self.original(*args, **kwargs)
        finally:
            self._inside.active = False


def enlist(members: list[Any], member: Any, stack: ExitStack) -> None:
    """Add ``member`` to ``members`` (the sessions a wrapper hands its calls to) until ``stack``
    closes; the removal is registered first.

    >>> sessions: list[str] = []
    >>> with ExitStack() as stack:
    ...     enlist(sessions, "mine", stack)
    ...     print(sessions)
    ['mine']
    >>> sessions
    []
    """

    def leave() -> None:
        if member in members:
            members.remove(member)

    stack.callback(leave)  # before the change it undoes
    members.append(member)
