"""Adapters are plug-ins: a user's own kernel, captured through the public protocol.

The worked example below (``fancy_attention`` and ``FancyAdapter``, under 60 lines) is what the
adapter protocol's docs point to: a kernel attnscope has never heard of, made visible by an
adapter that stands in front of it with ``attnscope.intercept.Replacement``.
"""

from __future__ import annotations

import math
import sys
from contextlib import ExitStack

import pytest
import torch
from torch import Tensor, nn

import attnscope
from attnscope.intercept import Replacement, observe

# -- the worked example: a custom kernel and its adapter ------------------------------------


def fancy_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """A user's own kernel: softmax(q kᵀ / √d + bias) v, weights never returned, its softmax
    written out (so not PyTorch's softmax, which attnscope would find by itself)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias
    exp = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (exp / exp.sum(-1, keepdim=True)) @ v


class FancyBlock(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = fancy_attention(q, k, v, self.bias)  # a module global: looked up at call time
        return out.transpose(1, 2).reshape(b, n, d)


class FancyAdapter:
    name = "fancy"
    recognises = ("FancyBlock (fancy_attention)",)

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in model.named_modules() if isinstance(m, FancyBlock)}

    def install(self, model, selected, recorder, stack: ExitStack, keep) -> None:  # type: ignore[no-untyped-def]
        running: list[str] = []  # the selected block whose forward is on the stack

        def around(module: nn.Module, args, kwargs, proceed):  # type: ignore[no-untyped-def]
            running.append(names[id(module)])
            try:
                return proceed()
            finally:
                running.pop()

        def kernel(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
            out = replacement.call_original(q, k, v, bias)  # the kernel itself, unchanged
            if running:
                shape = (q.size(0), q.size(1), q.size(2), k.size(2))
                weights = lambda rows: _weights(q if rows is None else q[:, :, rows], k, bias)  # noqa: E731
                recorder.record(
                    running[-1], attnscope.AttentionCall("self", shape, q.dtype, weights)
                )
            return out

        names = {id(m): n for n, m in selected.items()}
        for module in selected.values():
            observe(module, around, stack)
        replacement = Replacement(sys.modules[__name__], "fancy_attention", kernel)
        replacement.hold(stack)


def _weights(q: Tensor, k: Tensor, bias: Tensor) -> Tensor:
    with torch.no_grad():
        return (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias).softmax(-1)


# -- the tests -----------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(FancyBlock(), nn.ReLU(), FancyBlock())


def _by_hand(block: FancyBlock, x: Tensor) -> Tensor:
    b, n, _ = x.shape
    q, k, _ = block.qkv(x).view(b, n, 3, block.heads, -1).permute(2, 0, 3, 1, 4)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.size(-1)) + block.bias
    return torch.softmax(scores, dim=-1)


def test_a_users_adapter_captures_a_kernel_attnscope_never_heard_of() -> None:
    model, x = _model(), torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = model(x)
        with attnscope.capture(model, adapters=[FancyAdapter()]) as attn:
            out = model(x)
        hidden = torch.relu(model[0](x))
    assert torch.equal(out, expected)
    assert attn.names == ["0", "2"] and attn.kind("0") == "self"
    torch.testing.assert_close(attn["0"], _by_hand(model[0], x), atol=1e-6, rtol=0)
    torch.testing.assert_close(attn["2"], _by_hand(model[2], hidden), atol=1e-6, rtol=0)
    assert sys.modules[__name__].fancy_attention is fancy_attention  # restored
    with torch.no_grad(), attnscope.capture(model, adapters=[FancyAdapter()], rows=[0]) as one:
        model(x)
    torch.testing.assert_close(one["0"], attn["0"][:, :, [0]], atol=1e-6, rtol=0)


def test_a_registered_adapter_is_used_by_every_capture_until_unregistered() -> None:
    model, x = _model(), torch.randn(1, 4, 8)
    with (  # its modules are the user's own: only what runs can tell, so it runs first
        pytest.raises(attnscope.AttnScopeError, match="found no attention module"),
        torch.no_grad(),
        attnscope.capture(model),
    ):
        model(x)
    unregister = attnscope.register_adapter(FancyAdapter(), priority=30)
    try:
        names = [a.name for a in attnscope.adapters.default_adapters()]
        assert names[:2] == ["fancy", "torch.nn"] and "sdpa" in names
        with torch.no_grad(), attnscope.capture(model) as attn:
            model(x)
        assert attn.names == ["0", "2"]
    finally:
        unregister()
    assert "fancy" not in [a.name for a in attnscope.adapters.default_adapters()]


def test_what_is_not_an_adapter_is_refused_with_what_one_needs() -> None:
    with pytest.raises(
        attnscope.AttnScopeError, match=r"lacks name, recognises, attention_modules, install"
    ):
        attnscope.register_adapter(object())  # type: ignore[arg-type]
    with pytest.raises(attnscope.AttnScopeError, match="takes a list of adapters"):
        attnscope.capture(_model(), adapters=FancyAdapter()).__enter__()  # type: ignore[arg-type]


def test_a_module_an_adapter_claims_is_not_recorded_again_by_sdpa() -> None:
    """A user's adapter for a module that calls sdpa inside: one record per call, its own."""

    class Claimer:
        name, recognises = "claimer", ("MultiheadAttention-free sdpa blocks",)

        def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
            return {"inner": model.inner}

        def install(self, model, selected, recorder, stack, keep) -> None:  # type: ignore[no-untyped-def]
            def around(module, args, kwargs, proceed):  # type: ignore[no-untyped-def]
                out = proceed()
                recorder.record(
                    "inner", attnscope.AttentionCall.of_weights("self", torch.ones(1, 1, 2, 2) / 2)
                )
                return out

            for module in selected.values():
                observe(module, around, stack)

    class Inner(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.scaled_dot_product_attention(x, x, x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)

    model = Outer()
    with attnscope.capture(model, adapters=[Claimer()]) as attn:
        model(torch.randn(1, 1, 2, 4))
    assert attn.names == ["inner"] and len(attn.calls("inner")) == 1
    assert torch.equal(attn["inner"], torch.ones(1, 1, 2, 2) / 2)


@pytest.mark.parametrize("lazy", [False, True])
def test_a_call_an_adapter_records_twice_keeps_its_values_for_both(lazy: bool) -> None:
    """The recorder must not change the call an adapter hands it: an adapter may record one
    call under two names (or keep it), and each record reads its values for the norms."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.o_proj(torch.softmax(self.q(x) @ x.mT, -1) @ x)

    class RecordsTwice:
        name, recognises = "twice", ("Twice",)

        def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
            return {"": model}

        def install(self, model, selected, recorder, stack, keep) -> None:  # type: ignore[no-untyped-def]
            def around(module, args, kwargs, proceed):  # type: ignore[no-untyped-def]
                out, x = proceed(), args[0]
                call = attnscope.AttentionCall.of_weights(
                    "self", torch.softmax(module.q(x) @ x.mT, -1)[:, None]
                )
                call.values = lambda: x[:, None]  # one head: the input itself
                recorder.record("a", call)
                recorder.record("b", call)
                return out

            observe(model, around, stack)

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(2, 3, 8)
    norms = {"a": "o_proj", "b": "o_proj"}
    with (
        torch.no_grad(),
        attnscope.capture(model, adapters=[RecordsTwice()], lazy=lazy, norms=norms) as attn,
    ):
        model(x)
    weights = torch.softmax(model.q(x) @ x.mT, -1)[:, None]
    value_norms = (x @ model.o_proj.weight.t()).norm(dim=-1)  # ‖x_j W_Oᵀ‖, (batch, key)
    by_hand = weights * value_norms[:, None, None, :]  # A_ij ‖f(x_j)‖ (Kobayashi et al.)
    for name in ("a", "b"):
        torch.testing.assert_close(attn[name], weights)
        torch.testing.assert_close(attn.norms(name), by_hand, atol=1e-6, rtol=0)
