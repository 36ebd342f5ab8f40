"""Models a capture cannot observe, refused before anything runs, with what to do instead.

- ``torch.compile``: Dynamo traces the Python forward once into a graph and replays the graph;
  an observer installed on the module is either traced in (and fails inside Dynamo) or never
  called. The uncompiled module (``compiled._orig_mod``) runs the very same weights eagerly.
- TorchScript (``torch.jit.script`` / ``trace``): the forward is TorchScript code, not Python
  that attnscope can observe.
- parameters or buffers on the ``meta`` device hold no values: there is nothing to attend with.
"""

from __future__ import annotations

from torch import jit, nn

from .errors import AttnScopeError


def check_capturable(model: nn.Module) -> None:
    """Raise ``AttnScopeError`` for a model that a capture cannot observe, saying what to do.

    >>> import torch
    >>> check_capturable(torch.nn.Linear(2, 2))  # an ordinary module: nothing to say
    >>> check_capturable(torch.nn.Linear(2, 2, device="meta"))
    Traceback (most recent call last):
    ...
    attnscope.errors.AttnScopeError: the model's weight is on the meta device ...
    """
    modules = list(model.named_modules())  # one walk: a capture's entry pays for it
    for name, module in modules:
        where = f"{type(module).__name__} at {name!r}" if name else type(module).__name__
        if _is_compiled(module):
            raise AttnScopeError(
                f"{where} is compiled with torch.compile, which replays a traced graph that "
                "attnscope cannot observe. Capture the uncompiled model: pass and run "
                "`model._orig_mod` (the same module, same weights) inside the capture, or "
                "capture before calling torch.compile / module.compile()"
            )
        if isinstance(module, jit.ScriptModule):
            raise AttnScopeError(
                f"{where} is a TorchScript module (torch.jit.script / torch.jit.trace), whose "
                "forward attnscope cannot observe. Capture the Python nn.Module it was made from"
            )
    for kind in ("_parameters", "_buffers"):  # every parameter first, then every buffer
        for name, module in modules:
            for own, tensor in getattr(module, kind).items():
                if tensor is not None and tensor.is_meta:
                    raise AttnScopeError(
                        f"the model's {f'{name}.{own}' if name else own} is on the meta device "
                        "(shapes only, no values), so nothing can be attended to. Materialise "
                        "the model first, for example `model.to_empty(device='cpu')` and then "
                        "load its state_dict"
                    )


def _is_compiled(module: nn.Module) -> bool:
    # torch.compile(module) wraps it in an OptimizedModule holding ``_orig_mod``;
    # module.compile() compiles in place and sets ``_compiled_call_impl``
    wrapped = type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")
    return wrapped or getattr(module, "_compiled_call_impl", None) is not None
