"""Weights straight from PyTorch's native CPU attention kernel, for the cost of keeping them.

Design note
-----------
On the CPU, ``torch._native_multi_head_attention`` (behind ``nn.MultiheadAttention``'s fast
path, and inside the fused encoder layer ``torch._transformer_encoder_layer_fwd``) always
materialises ``softmax(q kᵀ)`` for every head: ``need_weights`` only decides whether it is
returned, and the output is bit-identical either way (measured on torch 2.13 over shapes,
dtypes, masks and nested input; ``tests/test_native_weights.py`` keeps checking it). So a
capture on those paths need not recompute anything: it asks the kernel for what it computed.

- ``torch._native_multi_head_attention``, called by an observed ``nn.MultiheadAttention``
  with ``need_weights=False``, is called with ``need_weights=True, average_attn_weights=False``
  and returns ``(output, None)``, as it would have.
- ``torch._transformer_encoder_layer_fwd``, called by an observed encoder layer, runs as the
  composition its C++ implementation is (``aten/src/ATen/native/transformers/
  transformer.cpp``: layer norm, native attention, residual, layer norm, ``addmm`` with fused
  activation, ``addmm``, residual, layer norm; the same ops in the same order), with the
  attention asked for its weights. Output: bit-identical to the fused call.

Both are looked up on ``torch`` when ``nn``'s forwards run, so while a capture that wants
weights is active they are thin wrappers (``intercept.Replacement``). A wrapper acts only for
the requests on its thread (``requested``, opened by the torch.nn adapter around an observed
module's call) that name the module whose very parameters it was given; anything else passes
straight through. Nested captures of one module each open a request, and the one computation
answers them all, so they get identical weights.

Why a composition, not the simpler route (the fused kernel left alone and the weights
recomputed beside it from the layer's input and in_proj weights, as ``torch_nn.mha_call``
does off the CPU or when another function stands in front of the kernel): the kernel has
computed the weights already, and a recompute does the q/k projection, ``q kᵀ`` and softmax
over again. The 16-shape run (``benchmarks/README.md``'s history; ``benchmarks/perf.py``'s
``full-recompute`` and ``lazy-recompute`` variants measure it now) over d_model 256/512, length
128/512, batch 1/8, with and without a padding mask, that is nested tensors; 2 layers, 8
heads, eval + ``no_grad``, a 2-core CPU at one thread; the median over 25 interleaved rounds
of the per-round ratio to the plain forward):

- noise, the plain forward against itself: 0.97-1.01x, 25-75% spread within 0.94-1.03x;
- composition 1.02-1.54x; recompute 1.34-2.06x, 0.18 to 0.89 above the composition in every
  shape (d_model 256, batch 8 x 512: 1.02x against 1.37x; d_model 512 with padding: 1.11x
  against 2.00x);
- a bare recompute outside attnscope (one projection, ``q kᵀ``, softmax in place, the maps
  kept): 1.21-1.57x.

So the composition stays; ``tests/test_native_weights.py`` checks it against the fused kernel
bit for bit, so a PyTorch whose kernel changes is caught there.

A lazy capture must not hold L² weights: it asks for the scaled queries and keys the kernel's
softmax reads instead. For those the kernel runs as its own composition too (``attention.cpp``:
projection, ``_transform_bias_rescale_qkv``, ``q kᵀ``, masked softmax, ``·v``, output
projection; ``native_attention``), bit-identical on dense self-attention, and a compact copy
of q and k is kept (the packed q/k/v buffer goes back to the allocator, as it would have).
Nothing of the module is then held, so a later optimizer step changes nothing, and no
projection is recomputed. That is where q and k are the smaller thing to hold: batch x length
up to about twice the embedding size (BERT-base at 512 tokens, batch 1). Beyond it, and on
nested input, the kernel runs itself and the lazy capture holds copies of the layer's input
and of the query and key projections (half of q and k, plus a constant; pooled, see
``torch_nn._owned``), computing q and k on access: less memory, and less to write during the
forward. Keeping q and k buys memory, not time: in the 16-shape run a lazy capture's forward
costs the same by either route where both apply (1.07-1.47x, the q/k
route between 0.02 faster and 0.06 slower), and two layers at batch 1, length 128 hold 0.5
MiB instead of 1.25 MiB (d_model 256) and 1 MiB instead of 4.5 MiB (d_model 512).

Where this does not apply, the adapter recomputes beside the kernel: off the CPU (on CUDA,
``need_weights`` moves the kernel from sdpa to its math path, which changes the output's
bits), and on every slow path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .. import pool
from ..intercept import Replacement, uninterruptible


class Request:
    """An observed call, waiting for what the kernel computes with ``qkv_weight``: its weights,
    or, with ``queries`` (a lazy capture), the scaled queries and keys its softmax reads."""

    def __init__(self, qkv_weight: Tensor | None, queries: bool = False) -> None:
        self.qkv_weight = qkv_weight
        self.queries = queries
        self.weights: Tensor | None = None
        self.qk: tuple[Tensor, Tensor] | None = None
        # the native kernel ran for this call, answering or not (it ignores the is_causal hint)
        self.native = False

    @property
    def answered(self) -> bool:
        return self.weights is not None or self.qk is not None


_local = threading.local()


def _call_through(which: str, *args: Any, **kwargs: Any) -> Any:
    """Call the function the wrapper replaced (PyTorch's, or whoever's was there before)."""
    return _REPLACEMENTS[which].call_original(*args, **kwargs)


def _pending(qkv_weight: Any, device: torch.device, replaceable: bool) -> list[Request]:
    """The requests on this thread for the module whose ``qkv_weight`` the kernel was given
    (marked ``native``), not answered yet, when this wrapper may answer them. Nested captures
    of one module each have one: they are all answered from the one computation."""
    requests: list[Request] | None = getattr(_local, "requests", None)
    if not requests:
        return []
    mine = [request for request in requests if request.qkv_weight is qkv_weight]
    for request in mine:
        request.native = True
    if device.type != "cpu" or not replaceable:
        return []
    return [request for request in mine if not request.answered]


def _answer(requests: list[Request], kept: Any, queries: bool) -> None:
    """Hand what the kernel computed to every waiting request: the first gets it, the others
    copies of the weights (each capture owns its tensors) or the same read-only queries."""
    for index, request in enumerate(requests):
        if queries:
            request.qk = kept
        else:
            request.weights = kept if index == 0 else kept.clone()


@contextmanager
def requested(attention: nn.MultiheadAttention, queries: bool = False) -> Iterator[Request]:
    """While the body runs, ``attention``'s native kernel (called by the attention itself or by
    its fused encoder layer) hands its weights to the request, or with ``queries`` its scaled
    queries and keys (where ``native_attention`` can stand in for it: not on nested input)."""
    request = Request(attention.in_proj_weight, queries)
    requests: list[Request] | None = getattr(_local, "requests", None)
    if requests is None:
        requests = _local.requests = []
    try:
        requests.append(request)
        yield request
    finally:
        if request in requests:
            requests.remove(request)


def hold(stack: ExitStack) -> None:
    """Put the wrappers in front of PyTorch's kernels until ``stack`` closes (reference
    counted; a function someone replaced meanwhile keeps their replacement)."""
    for replacement in _REPLACEMENTS.values():
        replacement.hold(stack)


def activate() -> Callable[[], None]:
    """``hold`` with its own stack: returns the undo."""
    stack = ExitStack()
    with uninterruptible():
        hold(stack)
    return stack.close


def _native_mha_with_weights(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    mask: Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    mask_type: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    args = (query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias)
    # only PyTorch's own kernel is asked for weights; another function installed before the
    # capture gets exactly the call it would have got
    replaceable = not need_weights and _REPLACEMENTS["mha"].replaces_kernel
    requests = _pending(qkv_weight, query.device, replaceable)
    queries = all(request.queries for request in requests)
    if not requests or (queries and not _keeps_queries(query, key, value, embed_dim)):
        return _call_through("mha", *args, mask, need_weights, average_attn_weights, mask_type)
    kept: Any
    if queries:
        output, kept = _attention_keeping_queries(*args, mask, mask_type)
    else:  # PyTorch's own kernel (checked above), asked for the weights it computes anyway
        output, kept = _attention_with_weights(*args, mask, mask_type)
    _answer(requests, kept, queries)
    return output, None


def _encoder_layer_with_weights(*args: Any, **kwargs: Any) -> Tensor:
    src = args[0] if args else None
    # the composition stands in for PyTorch's kernel only: a function someone else installed
    # before the capture (a profiler, a custom kernel) is called, never bypassed
    ours_to_replace = _REPLACEMENTS["layer"].replaces_kernel
    requests = (
        _pending(args[3], src.device, ours_to_replace)
        if len(args) == 20 and not kwargs and isinstance(src, Tensor)
        else []
    )
    if not requests or src is None or _is_empty(src):
        return _call_through("layer", *args, **kwargs)
    queries = all(request.queries for request in requests)
    kept: Any
    if queries:
        if not _keeps_queries(src, src, src, args[1]):
            return _call_through("layer", *args, **kwargs)
        output, kept = encoder_layer_forward(*args, attention=_attention_keeping_queries)
    else:
        output, kept = encoder_layer_forward(*args)
    _answer(requests, kept, queries)
    return output


_REPLACEMENTS = {
    "mha": Replacement(torch, "_native_multi_head_attention", _native_mha_with_weights),
    "layer": Replacement(torch, "_transformer_encoder_layer_fwd", _encoder_layer_with_weights),
}

_Kept = TypeVar("_Kept")


def _attention_with_weights(
    query: Tensor, key: Tensor, value: Tensor, *args: Any
) -> tuple[Tensor, Tensor]:
    """PyTorch's kernel itself, asked for the per-head weights it computes anyway."""
    *params, mask, mask_type = args
    output, weights = torch.ops.aten._native_multi_head_attention(
        query, key, value, *params, mask, True, False, mask_type
    )
    return output, weights


def _keeps_queries(query: Tensor, key: Tensor, value: Tensor, embed_dim: int) -> bool:
    """Whether a lazy capture keeps this call's queries and keys: where ``native_attention``
    computes what the kernel computes, and they take no more memory than what the adapter
    holds otherwise (the input, and a copy of the query and key projections)."""
    composable = query is key and key is value and not query.is_nested and query.dim() == 3
    return composable and 0 < query.numel() <= 2 * embed_dim * (embed_dim + 1)


def native_attention(
    query: Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    mask: Tensor | None,
    mask_type: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch._native_multi_head_attention`` on the CPU for self-attention on a dense
    (batch, length, embed) query, op for op (``attention.cpp``: projection, bias and
    rescaling, ``q kᵀ``, masked softmax, ``·v``, output projection): its output, and the
    queries (already scaled by 1/√head_dim) and keys its softmax read, (batch, heads, L, d).

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 8)
    >>> params = (8, 2, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
    ...           mha.out_proj.bias)
    >>> with torch.no_grad():
    ...     out, q, k = native_attention(x, *params, None, None)
    ...     kernel, _ = torch._native_multi_head_attention(x, x, x, *params)
    >>> torch.equal(out, kernel), tuple(q.shape)
    (True, (2, 2, 5, 4))
    """
    # detached: matmul folds the batch differently for a weight that requires grad, even under
    # no_grad, and only the kernel's way (a batched product for a strided query) gives its bits
    q, k, v = torch._transform_bias_rescale_qkv(
        torch.matmul(query, qkv_weight.detach().t()), qkv_bias, num_head
    )
    batch, heads, length, head_dim = q.shape
    flat = (batch * heads, length, head_dim)
    scores = torch.bmm(q.view(flat), k.view(flat).transpose(2, 1))
    scores = scores.view(batch, heads, length, length)
    if mask is None:  # in place, as the kernel does
        weights = torch._softmax(scores, -1, False, out=scores)
    else:
        weights = torch._masked_softmax(scores, mask.bool(), scores.dim() - 1, mask_type)
    context = torch.bmm(weights.view(batch * heads, length, length), v.view(flat))
    del weights, scores
    merged = context.view(batch, heads, length, head_dim).permute(0, 2, 1, 3).contiguous()
    output = F.linear(merged.view(batch * length, embed_dim), proj_weight, proj_bias)
    return output.view(batch, length, -1), q, k


def _attention_keeping_queries(
    query: Tensor, key: Tensor, value: Tensor, *args: Any
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``native_attention``, keeping a compact copy of its queries and keys (not the packed
    q/k/v buffer: that one goes back to the allocator, as it would have). CPU only."""
    output, q, k = native_attention(query, *args)
    kept_q, kept_k = pool.copies(q, k)  # warm pages, see ``pool``
    return output, (kept_q, kept_k)


def _is_empty(src: Tensor) -> bool:
    return (src.values() if src.is_nested else src).numel() == 0


def encoder_layer_forward(
    src: Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm1_weight: Tensor,
    norm1_bias: Tensor,
    norm2_weight: Tensor,
    norm2_bias: Tensor,
    ffn_weight_1: Tensor,
    ffn_bias_1: Tensor,
    ffn_weight_2: Tensor,
    ffn_bias_2: Tensor,
    mask: Tensor | None,
    mask_type: int | None,
    *,
    attention: Callable[..., tuple[Tensor, _Kept]] = _attention_with_weights,  # type: ignore[assignment]
) -> tuple[Tensor, _Kept]:
    """``torch._transformer_encoder_layer_fwd``'s output, op for op, and what ``attention``
    kept of its attention (by default the weights; ``attention`` stands in for
    ``torch._native_multi_head_attention`` and must compute its output bit for bit).

    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 8)
    >>> a = layer.self_attn
    >>> args = (x, 8, 2, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
    ...         False, False, 1e-5, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
    ...         layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
    ...         layer.linear2.weight, layer.linear2.bias, None, None)
    >>> with torch.no_grad():
    ...     out, weights = encoder_layer_forward(*args)
    ...     fused = torch._transformer_encoder_layer_fwd(*args)
    >>> torch.equal(out, fused), tuple(weights.shape)
    (True, (2, 2, 5, 5))
    """

    def norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.layer_norm(x, [embed_dim], weight, bias, eps, True)

    x = norm(src, norm1_weight, norm1_bias) if norm_first else src
    x, kept = attention(
        x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
        mask, mask_type,
    )  # fmt: skip
    x.add_(src)
    if not norm_first:
        x = norm(x, norm1_weight, norm1_bias)
    before_ffn = x
    if norm_first:
        x = norm(x, norm2_weight, norm2_bias)
    x = _linear(x, ffn_weight_1, ffn_bias_1, use_gelu)
    x = _linear(x, ffn_weight_2, ffn_bias_2, None)
    x.add_(before_ffn)
    if not norm_first:
        x = norm(x, norm2_weight, norm2_bias)
    return x, kept


def _linear(x: Tensor, weight: Tensor, bias: Tensor, use_gelu: bool | None) -> Tensor:
    """transformer.cpp's ``linear_for_ffn``: ``addmm`` (with its fused relu or gelu) on the
    flattened batch; nested input takes the nested linear, as its nested ``addmm`` does."""
    if x.is_nested:
        x = F.linear(x, weight, bias)
        if use_gelu is None:
            return x
        return F.gelu(x) if use_gelu else F.relu(x)
    flat = x.view(x.size(0) * x.size(1), x.size(2))
    if use_gelu is None:
        out = torch.addmm(bias, flat, weight.t())
    else:
        out = torch._addmm_activation(bias, flat, weight.t(), beta=1, alpha=1, use_gelu=use_gelu)
    return out.view(x.size(0), x.size(1), -1)
