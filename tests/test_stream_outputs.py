"""``exact_outputs=False``: an sdpa call's output from the weights a stream or capture records
(w · v).

References: the same stream with the kernel's own outputs (the weights), Hugging Face's eager
weights (a capture's), the plain forward (the model's output at valid positions, to float32
rounding), and a count of kernel calls.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnscope.adapters import sdpa
from attnscope.capture import stream
from hf_models import Family, build, valid_queries

FLOAT32_FAMILIES = ("bert", "distilbert", "gpt2", "llama", "bart", "t5", "vit")


def _streamed(family: Family, exact: bool) -> tuple[list[tuple[str, str, torch.Tensor]], Any]:
    seen: list[tuple[str, str, torch.Tensor]] = []
    with (
        torch.no_grad(),
        stream(family.model, lambda n, k, w: seen.append((n, k, w.clone())), exact_outputs=exact),
    ):
        out = family.model(**family.inputs)
    return seen, out


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state


def _counting_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = sdpa._SDPA.call_original

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa._SDPA, "call_original", counted)
    return calls


def _assert_weights_close(
    family: Family, kind: str, got: torch.Tensor, want: torch.Tensor, name: str
) -> None:
    """Weights within float32 rounding at the queries that are not padding."""
    rows = valid_queries(family, kind, got.size(2))
    if rows is not None:
        got, want = got * rows[:, None, :, None], want * rows[:, None, :, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _assert_valid_outputs_close(family: Family, got: torch.Tensor, plain: torch.Tensor) -> None:
    """The model's output within float32 rounding of the plain one at its valid positions."""
    mask = family.inputs.get("attention_mask")
    if mask is not None and "decoder_input_ids" not in family.inputs:
        got, plain = got[mask.bool()], plain[mask.bool()]
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FLOAT32_FAMILIES)
def test_weights_match_the_kernels_stream_and_valid_outputs_the_plain_forward(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = build(name)
    with torch.no_grad():
        plain = _hidden(family.model(**family.inputs))
    exact, exact_out = _streamed(family, exact=True)
    assert torch.equal(_hidden(exact_out), plain)  # the default keeps the kernel's outputs
    kernel_calls = _counting_kernel(monkeypatch)
    fast, fast_out = _streamed(family, exact=False)
    assert kernel_calls[0] == 0  # every call answered from its weights
    assert [(n, k) for n, k, _ in fast] == [(n, k) for n, k, _ in exact]
    for (name_, kind, got), (_, _, want) in zip(fast, exact, strict=True):
        _assert_weights_close(family, kind, got, want, name_)  # padded queries: zeros in both
    _assert_valid_outputs_close(family, _hidden(fast_out), plain)


def test_half_precision_dropout_and_gradients_keep_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel_calls = _counting_kernel(monkeypatch)
    family = build("bert")
    model, inputs = family.model, family.inputs

    def run(model: torch.nn.Module, grad: bool) -> tuple[torch.Tensor, int]:
        seen: list[str] = []
        before = kernel_calls[0]
        with (
            torch.set_grad_enabled(grad),
            stream(model, lambda n, k, w: seen.append(n), exact_outputs=False),
        ):
            out = model(**inputs).last_hidden_state
        assert len(seen) == 2
        return out, kernel_calls[0] - before

    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
    out, calls = run(model, grad=True)  # a graph to build: the kernel's outputs
    assert calls == 2 and torch.equal(out.detach(), plain)
    model.train()  # dropout in the kernel
    torch.manual_seed(3)
    out, calls = run(model, grad=False)
    torch.manual_seed(3)
    with torch.no_grad(), stream(model, lambda n, k, w: None):
        expected = model(**inputs).last_hidden_state
    assert calls == 2 and torch.equal(out, expected)
    model.eval()
    half = build("bert").model.to(torch.bfloat16)
    with torch.no_grad():
        plain = half(**inputs).last_hidden_state
    out, calls = run(half, grad=False)
    assert calls == 2 and torch.equal(out, plain)


def test_a_module_calling_sdpa_twice_with_the_same_query_and_key_is_recorded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class TwoHalves(torch.nn.Module):  # DiffLlama's pattern: one map, two halves of the values
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            first, second = v.chunk(2, dim=-1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, first)
            b = torch.nn.functional.scaled_dot_product_attention(q, k, second)
            return torch.cat([a, b], dim=-1)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = TwoHalves()

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attn(q, k, v)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator) for _ in range(3))
    model = Model()
    kernel_calls = _counting_kernel(monkeypatch)
    seen: list[torch.Tensor] = []
    with torch.no_grad(), stream(model, lambda n, kd, w: seen.append(w), exact_outputs=False):
        out = model(q, k, v)
    assert len(seen) == 1 and kernel_calls[0] == 1  # the first from its weights, then the kernel
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(out, torch.cat([expected @ v[..., :4], expected @ v[..., 4:]], -1))


def test_exact_outputs_must_be_a_bool() -> None:
    from attnscope import AttnScopeError

    model = build("bert").model
    with (
        pytest.raises(AttnScopeError, match="exact_outputs= takes True or False"),
        stream(model, lambda n, k, w: None, exact_outputs="no"),  # type: ignore[arg-type]
    ):
        pass


class _Sdpa(torch.nn.Module):
    """A module that calls sdpa with the keywords it was made with."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **self.options)


def _both_streams(
    module: torch.nn.Module, *inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain output, fast output, exact stream's weights, fast stream's weights)."""
    with torch.no_grad():
        plain = module(*inputs)
        weights: dict[bool, torch.Tensor] = {}
        outputs = {}
        for exact in (True, False):
            with stream(
                module,
                lambda n, k, w, exact=exact: weights.__setitem__(exact, w.clone()),
                exact_outputs=exact,
            ):
                outputs[exact] = module(*inputs)
    assert torch.equal(outputs[True], plain)
    return plain, outputs[False], weights[True], weights[False]


def _qkv(batch: int, heads: int, queries: int, keys: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, 8, generator=g)
    return [q, *(torch.randn(batch, heads, keys, 8, generator=g) for _ in range(2))]


def test_rows_a_float_mask_hides_at_its_minimum_give_the_kernels_output() -> None:
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, 2] = torch.finfo(torch.float32).min  # Hugging Face's way: row 2 sees no key
    plain, fast, exact_w, fast_w = _both_streams(_Sdpa(attn_mask=mask), *_qkv(2, 3, 4, 4))
    torch.testing.assert_close(fast, plain)  # the kernel averages the values there
    assert torch.equal(fast_w[1, :, 2], torch.zeros(3, 4))  # the convention: a zero row
    torch.testing.assert_close(fast_w, exact_w)


def test_causal_with_a_mask_applies_both_and_a_3d_value_broadcasts() -> None:
    q, k, v = _qkv(2, 3, 5, 5, seed=1)
    mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[..., 0] = True  # every query sees key 0
    plain, fast, exact_w, fast_w = _both_streams(_Sdpa(attn_mask=mask, is_causal=True), q, k, v)
    scores = (q @ k.transpose(-2, -1)) / 8**0.5
    allowed = mask & torch.ones(5, 5, dtype=torch.bool).tril()
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(exact_w, expected)  # causal AND the mask, as the kernel does
    torch.testing.assert_close(fast_w, expected)
    torch.testing.assert_close(fast, plain)
    value = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))  # one per head
    plain, fast, _, _ = _both_streams(_Sdpa(), q, k, value)
    torch.testing.assert_close(fast, plain)


def test_the_output_is_laid_out_as_the_kernels() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g).transpose(1, 2) for _ in range(3))
    plain, fast, _, _ = _both_streams(_Sdpa(), q, k, v)
    assert fast.stride() == plain.stride()
    fast.transpose(1, 2).view(2, 5, 24)  # what a caller of the kernel may do


def _query_layouts() -> list[tuple[str, torch.Tensor]]:
    """(2, 4, 3, 8) queries in every order of memory, broadcast, sliced and transposed."""
    import itertools

    shape = (2, 4, 3, 8)
    g = torch.Generator().manual_seed(6)
    layouts = []
    for perm in itertools.permutations(range(4)):
        stored = torch.randn([shape[p] for p in perm], generator=g)
        layouts.append((f"stored as {perm}", stored.permute([perm.index(d) for d in range(4)])))
    layouts.append(("broadcast batch", torch.randn(1, 4, 3, 8, generator=g).expand(2, -1, -1, -1)))
    layouts.append(("broadcast heads", torch.randn(2, 1, 3, 8, generator=g).expand(-1, 4, -1, -1)))
    layouts.append(("a slice", torch.randn(2, 4, 3, 16, generator=g)[..., :8]))
    return layouts


@pytest.mark.parametrize(("layout", "q"), _query_layouts())
def test_the_output_has_the_kernels_strides_whatever_the_querys_layout(
    layout: str, q: torch.Tensor
) -> None:
    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(2))
    plain, fast, _, _ = _both_streams(_Sdpa(), q, k, v)
    assert fast.stride() == plain.stride(), layout
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("what", "key_heads", "value_heads", "value_keys", "gqa"),
    [
        ("grouped keys without enable_gqa", 2, 2, 3, False),
        ("query heads not a multiple of the key heads", 3, 3, 3, True),
        ("keys and values with other heads", 4, 2, 3, False),
    ],
)
def test_a_call_outside_the_plain_math_gets_the_kernels_answer(
    what: str, key_heads: int, value_heads: int, value_keys: int, gqa: bool
) -> None:
    """The kernel's own output or its own error, whichever it gives. (Values for other keys
    than the keys go to the kernel too, but there the CPU kernel reads past the values and
    its output differs from run to run: nothing to compare.)"""
    q, _, _ = _qkv(1, 4, 3, 3)
    k = _qkv(1, key_heads, 3, 3, seed=1)[1]
    v = _qkv(1, value_heads, 3, value_keys, seed=2)[2]
    module = _Sdpa(enable_gqa=True) if gqa else _Sdpa()

    def answer() -> torch.Tensor | str:
        try:
            return module(q, k, v)
        except RuntimeError as error:
            return str(error)

    with torch.no_grad():
        plain = answer()
        with stream(module, lambda n, kd, w: None, exact_outputs=False):
            fast = answer()
    if isinstance(plain, str):
        assert fast == plain, what
    else:
        assert isinstance(fast, torch.Tensor) and torch.equal(fast, plain), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_float32_inputs_keep_the_kernels_output(dtype: torch.dtype) -> None:
    q, k, v = _qkv(2, 4, 5, 6)
    module = _Sdpa()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        plain = module(q, k, v)
        with stream(module, lambda n, kd, w: None, exact_outputs=False):
            fast = module(q, k, v)
    assert fast.dtype == plain.dtype == dtype
    assert torch.equal(fast, plain)


def test_an_encoder_decoders_padded_decoder_rows_keep_their_cross_attention() -> None:
    family = build("t5")
    inputs = dict(family.inputs)
    inputs["decoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    family.inputs = inputs
    exact, _ = _streamed(family, exact=True)
    fast, _ = _streamed(family, exact=False)
    for (name, kind, got), (_, _, want) in zip(fast, exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} ({kind})")


# -- capture(exact_outputs=False): the same answer, the weights kept ------------------------


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_a_capture_answered_from_its_weights_keeps_eagers_weights_and_the_plain_outputs(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnscope import capture
    from hf_models import eager_attentions

    family = build(name)
    with torch.no_grad():
        plain = _hidden(family.model(**family.inputs))
    eager = eager_attentions(family)  # the independent reference: HF's own eager weights
    kernel_calls = _counting_kernel(monkeypatch)
    with torch.no_grad(), capture(family.model, exact_outputs=False) as attn:
        out = family.model(**family.inputs)
    assert kernel_calls[0] == 0  # every call answered from the weights it recorded
    assert [attn.kind(n) for n in attn.names] == family.kinds
    for n, want in zip(attn.names, eager, strict=True):
        # eager gives padded queries a row; the convention zeros them
        _assert_weights_close(family, attn.kind(n), attn[n], want, n)
    _assert_valid_outputs_close(family, _hidden(out), plain)


def test_a_capture_of_some_heads_or_rows_keeps_the_kernel_and_its_exact_outputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from attnscope import capture

    family = build("bert")
    with torch.no_grad():
        plain = _hidden(family.model(**family.inputs))
    kernel_calls = _counting_kernel(monkeypatch)
    for option in ({"heads": [0]}, {"rows": [0]}):
        kernel_calls[0] = 0
        with torch.no_grad(), capture(family.model, exact_outputs=False, **option) as attn:
            out = family.model(**family.inputs)
        assert kernel_calls[0] == len(attn.names) > 0, option
        assert torch.equal(_hidden(out), plain), option


def test_lazy_and_exact_outputs_false_exclude_each_other() -> None:
    from attnscope import AttnScopeError, capture

    model = build("bert").model
    with (
        pytest.raises(AttnScopeError, match="lazy=True and exact_outputs=False"),
        capture(model, lazy=True, exact_outputs=False),
    ):
        pass


def test_max_bytes_refuses_before_any_map_is_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnscope import AttnScopeError, capture

    computed: list[tuple[int, ...]] = []
    original = sdpa.softmax_weights

    def recording(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        computed.append(tuple(q.shape))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(sdpa, "softmax_weights", recording)
    q = torch.randn(1, 4, 64, 8)  # a 64 KiB map
    module = _Sdpa()
    with (
        torch.no_grad(),
        pytest.raises(AttnScopeError, match="refused before allocating"),
        capture(module, max_bytes=1000, exact_outputs=False),
    ):
        module(q, q, q)
    assert computed == []
