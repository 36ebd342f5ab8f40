"""FlexAttention: weights against a hand computation, outputs unchanged, nothing left behind.

Eager ``flex_attention`` on the CPU compiles its op with Dynamo's eager backend at every new
score_mod, mask_mod or shape (about 0.2 s each, 2 s for the first in a process), so shapes stay
tiny and each test builds few mods.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import attnscope

fa = pytest.importorskip("torch.nn.attention.flex_attention")
from torch.nn.attention.flex_attention import (  # noqa: E402
    create_block_mask,
    flex_attention,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile:UserWarning",
    "ignore:return_lse is deprecated:FutureWarning",
)

KERNEL = fa.flex_attention
L, D = 8, 8
QI = torch.arange(L).view(L, 1)
KI = torch.arange(L).view(1, L)
CAUSAL = QI >= KI


class FlexAttention(nn.Module):
    """Calls flex_attention through the name bound at import, as most code does."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flex_attention(q, k, v, **self.options)


class ByAttribute(nn.Module):
    """Calls it through its module, looked up at call time."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return fa.flex_attention(q, k, v)


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn = attention
        self.out = nn.Linear(D, D)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.out(self.attn(q, k, v))


def qkv(batch: int = 1, heads: int = 2, kv_heads: int | None = None) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(batch * 100 + heads)
    kv_heads = kv_heads or heads

    def draw(h: int) -> Tensor:
        return torch.randn(batch, h, L, D, generator=generator)

    return draw(heads), draw(kv_heads), draw(kv_heads)


def reference(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    cap: float | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """softmax((q kᵀ)·scale + bias, soft-capped), hidden keys at -inf, hidden rows zero; in
    float64, one map per query head."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = (q.double() @ k.double().transpose(-2, -1)) * (scale or q.size(-1) ** -0.5)
    if bias is not None:
        scores = scores + bias.double()
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def run(model: nn.Module, *inputs: Tensor, **options: object) -> attnscope.AttentionMaps:
    """Capture one forward; its output must be the uncaptured output, bit for bit."""
    expected = model(*inputs)
    with attnscope.capture(model, **options) as attn:  # type: ignore[arg-type]
        out = model(*inputs)
    assert torch.equal(out, expected)
    assert fa.flex_attention is KERNEL and globals()["flex_attention"] is KERNEL
    return attn


def close(weights: Tensor, expected: Tensor) -> None:
    assert weights.isfinite().all()
    torch.testing.assert_close(weights.double(), expected, atol=2e-6, rtol=1e-5)


def test_no_mods() -> None:
    q, k, v = qkv(batch=2)
    attn = run(Block(FlexAttention()), q, k, v)
    assert attn.names == ["attn"] and attn.kind("attn") == "self"
    close(attn["attn"], reference(q, k))


def test_by_attribute() -> None:
    q, k, v = qkv()
    attn = run(Block(ByAttribute()), q, k, v)
    close(attn["attn"], reference(q, k))


def test_alibi_score_mod_per_head() -> None:
    q, k, v = qkv(heads=4)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + slopes[h] * (kv_idx - q_idx)

    attn = run(Block(FlexAttention(score_mod=alibi)), q, k, v)
    close(attn["attn"], reference(q, k, bias=slopes.view(4, 1, 1) * (KI - QI)))


def test_tanh_soft_capping_and_scale() -> None:
    q, k, v = qkv()
    q = q * 10  # scores large enough for the cap to matter

    def softcap(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return 5.0 * torch.tanh(score / 5.0)

    attn = run(Block(FlexAttention(score_mod=softcap, scale=0.3)), q, k, v)
    close(attn["attn"], reference(q, k, scale=0.3, cap=5.0))


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def test_causal_block_mask() -> None:
    q, k, v = qkv(batch=2)
    mask = create_block_mask(causal, None, None, L, L, device="cpu")
    attn = run(Block(FlexAttention(block_mask=mask)), q, k, v)
    assert attn.kind("attn") == "causal"
    close(attn["attn"], reference(q, k, keep=CAUSAL))


def test_sliding_window_block_mask() -> None:
    q, k, v = qkv()

    def window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 3)

    mask = create_block_mask(window, None, None, L, L, device="cpu")
    attn = run(Block(FlexAttention(block_mask=mask)), q, k, v)
    assert attn.kind("attn") == "causal"
    close(attn["attn"], reference(q, k, keep=CAUSAL & (QI - KI < 3)))


def test_document_mask_differs_per_batch_item() -> None:
    q, k, v = qkv(batch=2)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])

    def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return documents[b, q_idx] == documents[b, kv_idx]

    mask = create_block_mask(same_document, 2, None, L, L, device="cpu")
    attn = run(Block(FlexAttention(block_mask=mask)), q, k, v)
    keep = (documents[:, :, None] == documents[:, None, :]).unsqueeze(1)
    assert attn.kind("attn") == "self"
    weights = attn["attn"]
    close(weights, reference(q, k, keep=keep))
    assert weights[0, :, 0, 3:].abs().max() == 0 and weights[1, :, 0, 3:6].abs().max() > 0


def test_lengths_per_batch_item_with_alibi() -> None:
    q, k, v = qkv(batch=3)
    lengths = torch.tensor([3, 8, 5])

    def within(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx < lengths[b]

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - 0.5 * (q_idx - kv_idx).abs()

    mask = create_block_mask(within, 3, None, L, L, device="cpu")
    attn = run(Block(FlexAttention(score_mod=alibi, block_mask=mask)), q, k, v)
    keep = (lengths.view(3, 1, 1) > KI).unsqueeze(1).expand(3, 1, L, L)
    close(attn["attn"], reference(q, k, bias=-0.5 * (QI - KI).abs(), keep=keep))


def test_gqa_one_map_per_query_head() -> None:
    q, k, v = qkv(heads=4, kv_heads=2)
    slopes = torch.tensor([1.0, 0.5, 0.25, 0.125])  # by query head: flex's `h`

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + slopes[h] * (kv_idx - q_idx)

    attn = run(Block(FlexAttention(score_mod=alibi, enable_gqa=True)), q, k, v)
    assert attn["attn"].shape == (1, 4, L, L)
    close(attn["attn"], reference(q, k, bias=slopes.view(4, 1, 1) * (KI - QI)))


def test_fully_masked_row_is_zeros() -> None:
    q, k, v = qkv()

    def no_first_query(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx > 0)

    mask = create_block_mask(no_first_query, None, None, L, L, device="cpu")
    attn = run(Block(FlexAttention(block_mask=mask)), q, k, v)
    weights = attn["attn"]
    assert torch.equal(weights[:, :, 0], torch.zeros_like(weights[:, :, 0]))
    close(weights, reference(q, k, keep=CAUSAL & (QI > 0)))


def test_score_mod_that_masks_makes_it_causal() -> None:
    q, k, v = qkv()

    def future_out(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    attn = run(Block(FlexAttention(score_mod=future_out)), q, k, v)
    assert attn.kind("attn") == "causal"
    close(attn["attn"], reference(q, k, keep=CAUSAL))


def test_lse_and_aux_come_back_unchanged() -> None:
    q, k, v = qkv()
    mask = create_block_mask(causal, None, None, L, L, device="cpu")
    requests: list[dict[str, object]] = [{"return_lse": True}]
    if hasattr(fa, "AuxRequest"):
        requests.append({"return_aux": fa.AuxRequest(lse=True)})  # max_scores: not on CPU
    for request in requests:
        expected = flex_attention(q, k, v, block_mask=mask, **request)  # type: ignore[call-overload]
        model = FlexAttention(block_mask=mask, **request)
        with attnscope.capture(model) as attn:
            got = model(q, k, v)
        assert type(got) is type(expected) and len(got) == len(expected) == 2
        assert torch.equal(got[0], expected[0])
        second, wanted = got[1], expected[1]
        if isinstance(wanted, Tensor):
            assert torch.equal(second, wanted)
        else:
            assert torch.equal(second.lse, wanted.lse) and second.max_scores is None
        close(attn[""], reference(q, k, keep=CAUSAL))


def test_rows_and_lazy() -> None:
    q, k, v = qkv(heads=4, kv_heads=2)
    mask = create_block_mask(causal, None, None, L, L, device="cpu")
    model = Block(FlexAttention(block_mask=mask, enable_gqa=True))
    full = reference(q, k, keep=CAUSAL)
    close(run(model, q, k, v, rows=[0, -1])["attn"], full[:, :, [0, L - 1]])
    close(run(model, q, k, v, lazy=True)["attn"], full)
    close(run(model, q, k, v, heads=[3])["attn"], full[:, [3]])


def test_restored_after_an_exception_and_by_the_last_of_two_captures() -> None:
    q, k, v = qkv()
    model = Block(FlexAttention())
    with pytest.raises(RuntimeError, match="boom"), attnscope.capture(model):
        model(q, k, v)
        raise RuntimeError("boom")
    assert fa.flex_attention is KERNEL and globals()["flex_attention"] is KERNEL

    with attnscope.capture(model) as outer:
        with attnscope.capture(model) as inner:
            model(q, k, v)
        assert fa.flex_attention is not KERNEL  # still held by the outer capture
        assert globals()["flex_attention"] is not KERNEL
        model(q, k, v)
    assert fa.flex_attention is KERNEL and globals()["flex_attention"] is KERNEL
    assert len(outer.calls("attn")) == 2 and len(inner.calls("attn")) == 1


def test_other_threads_are_not_recorded() -> None:
    q, k, v = qkv()
    model = Block(FlexAttention())
    model(q, k, v)  # compiled here once, so the thread does not compile
    with attnscope.capture(model) as attn:
        worker = threading.Thread(target=model, args=(q, k, v))
        worker.start()
        worker.join()
    assert attn.names == []


COMPILED = torch.compile(flex_attention)  # compiled on first call: never called here
SCALED = functools.partial(flex_attention, scale=0.5)


class Compiled(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return COMPILED(q, k, v)


class Partial(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return SCALED(q, k, v)


def test_compiled_reference_warns_naming_the_module() -> None:
    model = Block(Compiled())
    capture = attnscope.capture(model)
    with pytest.warns(
        UserWarning, match=r"attn \(Compiled\) calls flex_attention through COMPILED"
    ):
        capture.__enter__()
    capture.__exit__(None, None, None)
    assert fa.flex_attention is KERNEL


def test_partial_warns_and_is_listed_as_skipped_when_it_runs() -> None:
    q, k, v = qkv()
    model = Block(Partial())
    expected = model(q, k, v)
    with (
        pytest.warns(UserWarning, match=r"attn \(Partial\) calls flex_attention through SCALED"),
        attnscope.capture(model) as attn,
    ):
        out = model(q, k, v)
    assert torch.equal(out, expected)
    assert attn.names == [] and "SCALED, a functools.partial" in attn.skipped["attn"]
    assert "forward" not in vars(model.attn)


def test_kernel_seen_only_once_per_call() -> None:
    """The attribute and the bound name are both replaced; a call goes through one of them."""
    q, k, v = qkv()

    class Both(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return flex_attention(q, k, v) + fa.flex_attention(q, k, v)

    attn = run(Block(Both()), q, k, v)
    assert len(attn.calls("attn")) == 2
