"""What a capture keeps beyond the weights: their gradients and the value norms that weight
them.

Design note
-----------
Gradients (``capture(grads=True)``). A kernel that never forms the weights A still gives
∂L/∂A exactly: its per-head output is O = A·V, so ∂L/∂A = ∂L/∂O · Vᵀ. Each call's record keeps
its values V (detached) and registers a hook on O that keeps ∂L/∂O when a backward inside the
block reaches it; ``grad()`` multiplies the two when read. Where a model forms A itself (an
eager implementation, a hand-written softmax), the hook is on that A: its gradient is ∂L/∂A.
The hooks are removed when the block ends, so nothing of attnscope stays on the graph.

Norms (``capture(norms=True)``, Kobayashi et al. 2020, "Attention is not only a weight"). The
output of head h at query i is Σ_j A_ij f_h(x_j), f_h(x) = (x W_V^h + b_V^h) W_O^h: the value
the kernel multiplies, through the head's slice of the output projection. ``‖f_h(x_j)‖`` is
computed as each call is recorded (the projection's weights of that moment), one (batch, heads,
key) vector per call; ``norms()`` is A_ij·‖f_h(x_j)‖.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import AttnScopeError

OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "out_lin", "wo", "o", "proj")
"""Attribute names of an attention module's output projection, looked for in this order on
the module, then as ``output.dense`` or the same names on its parent (BERT's
``attention.output.dense``, ViT's, ...)."""


class GradSlot:
    """One call's ∂L/∂A, from its values (batch, heads, key, dim) and the gradient that
    reaches its kernel's output (the tensor the kernel returned, whatever its layout)."""

    def __init__(
        self,
        name: str,
        values: Tensor | None,
        output: Tensor | None,
        weights: Tensor | None = None,
        note: str | None = None,
    ) -> None:
        self.name = name
        self.note = note
        self.values = None if values is None else values.detach()
        self.d_output: Tensor | None = None  # ∂L/∂O, or ∂L/∂A itself for ``weights``
        self.direct = False
        self.select: Callable[[Tensor], Tensor] = lambda grad: grad  # the capture's options
        self.handle = None
        if output is not None and output.requires_grad and self.values is not None:
            self.handle = output.register_hook(self._receive)
        elif weights is not None and weights.requires_grad:  # the model's own A, on the graph
            self.direct = True
            self.handle = weights.register_hook(self._receive)

    def _receive(self, grad: Tensor) -> None:
        grad = grad.detach()
        self.d_output = grad if self.d_output is None else self.d_output + grad

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()

    def grad(self) -> Tensor:
        """∂L/∂A, (batch, heads, query, key)."""
        if self.handle is None and self.note is not None:
            raise AttnScopeError(f"{self.name!r} has no gradient: {self.note}")
        if self.handle is None:
            raise AttnScopeError(
                f"{self.name!r} has no gradient: the call ran without an autograd graph "
                "(under no_grad or inference_mode, or on a kernel attnscope sees no output of, "
                "such as PyTorch's fused encoder path): run the forward and loss.backward() "
                "inside capture(model, grads=True) with gradients enabled"
            )
        if self.d_output is None:
            raise AttnScopeError(
                f"{self.name!r}: no backward reached this call inside the capture block; call "
                "loss.backward() inside `with attnscope.capture(model, grads=True) as attn:`"
            )
        if self.direct:
            return self.select(self.d_output)
        assert self.values is not None
        batch, heads, _, dim = self.values.shape
        # heads first, as the values: a 3-D call's output has no heads axis, a packed
        # decoding step's (batch, kv heads, groups, dim) one query per head
        d_output = self.d_output.reshape(batch, heads, -1, dim)
        return self.select(torch.matmul(d_output, self.values.transpose(-1, -2)))


def dropout_note(p: float) -> str:
    """Why a call that ran with attention dropout has no ∂L/∂A (``GradSlot``'s note)."""
    return (
        f"it ran with attention dropout (p={p}): dL/dO . V^T would be the gradient of the "
        "dropped-out weights, not of A; capture in eval mode"
    )


def output_projection(
    model: nn.Module, name: str, named: Mapping[str, str] | None = None
) -> nn.Module | None:
    """The output projection of the attention module ``name``: ``named[name]`` (a module
    path) when given, else found by ``OUTPUT_PROJECTIONS``."""
    if named and name in named:
        try:
            return model.get_submodule(named[name])
        except AttributeError as error:
            raise AttnScopeError(
                f"norms: no module {named[name]!r} in the model (named as the output "
                f"projection of {name!r})"
            ) from error
    module = model.get_submodule(name)
    for attribute in OUTPUT_PROJECTIONS:
        child = getattr(module, attribute, None)
        if _projection_weight(child) is not None:
            return child
    if "." in name or name:
        parent = model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
        output = getattr(parent, "output", None)
        for candidate in (
            getattr(output, "dense", None),
            *(getattr(parent, a, None) for a in OUTPUT_PROJECTIONS),
        ):
            if candidate is not module and _projection_weight(candidate) is not None:
                return candidate
    return None


def _projection_weight(module: object) -> Tensor | None:
    """The weight as (in, out): ``nn.Linear``'s transposed, GPT-2's ``Conv1D`` as it is."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return weight
    if isinstance(module, nn.Linear):
        return weight.t()
    return None


def value_norms(values: Tensor, projection: nn.Module, name: str) -> Tensor:
    """‖f_h(x_j)‖ = ‖v_j^h W_O^h‖ for per-head values (batch, heads, key, dim): (batch, heads,
    key). The projection's input is the heads' outputs side by side, head-major.

    >>> projection = nn.Linear(4, 3, bias=False)
    >>> v = torch.randn(1, 2, 5, 2)
    >>> got = value_norms(v, projection, "m")
    >>> by_hand = (v[0, 1] @ projection.weight[:, 2:].t()).norm(dim=-1)
    >>> torch.allclose(got[0, 1], by_hand)
    True
    """
    weight = _projection_weight(projection)
    heads, dim = values.size(1), values.size(3)
    if weight is None or weight.size(0) != heads * dim:
        raise AttnScopeError(
            f"norms: the output projection of {name!r} ({type(projection).__name__}) does not "
            f"take {heads} heads x {dim} values as input; name the right one: "
            f"capture(model, norms={{{name!r}: 'path.to.projection'}})"
        )
    with torch.no_grad():
        per_head = weight.detach().to(values.dtype).view(heads, dim, -1)  # (heads, dim, out)
        return torch.stack(
            [torch.matmul(values[:, h], per_head[h]).norm(dim=-1) for h in range(heads)], dim=1
        )


def check_norms_option(norms: object) -> Mapping[str, str] | None:
    """``norms=True`` or ``{module: output projection path}``; None when off."""
    if norms is False or norms is None:
        return None
    if norms is True:
        return {}
    if isinstance(norms, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in norms.items()
    ):
        return dict(norms)
    raise AttnScopeError(
        "norms= takes True, or a mapping from attention module names to their output "
        f"projections' names, e.g. {{'encoder.layer.0.attention.self': "
        f"'encoder.layer.0.attention.output.dense'}}; got {norms!r}"
    )


def select(vector: Tensor, heads: Sequence[int] | None) -> Tensor:
    return vector if heads is None else vector[:, list(heads)]
