"""Adapter for PyTorch's own attention: ``nn.MultiheadAttention`` and ``nn.Transformer*`` layers.

Design note
-----------
What is observed (see ``attnscope.intercept``; no module hook is ever registered, so the fused
encoder kernel stays in use):

- every selected ``nn.MultiheadAttention``: after its own forward ran unchanged, the weights
  are recomputed from the very query, key and masks it was given, mirroring
  ``F.multi_head_attention_forward`` (packed or separate projections, ``bias_k``,
  ``add_zero_attn``, bool or float masks, the ``is_causal`` hint, unbatched and nested input);
- every ``nn.TransformerEncoderLayer`` whose attention is selected: when its fused path
  (``torch._transformer_encoder_layer_fwd``) ran, its ``self_attn`` was never called, so the
  weights are recomputed from the layer's input (``norm1`` first when ``norm_first``) and
  attributed to the ``self_attn`` name, as the slow path would have;
- every ``nn.TransformerEncoder``: only to remember the padded shape and padding mask while it
  runs, because on its nested-tensor path the layers see neither.

Where either forward runs PyTorch's native CPU attention kernel (eval + ``no_grad``), that
kernel computes every head's weights anyway: an eager (non-lazy) capture takes them from it
instead of recomputing (``torch_native``), then brings them to the conventions below; a lazy
capture keeps the scaled queries and keys it computed, and its masked softmax runs on access.

Weights are those before dropout (dropout is a training-time perturbation of the weights, not
part of what the model attends to). Rows of padded queries in self-attention, and fully
masked rows, are zeros (``attnscope.padded_rows``).
Restored on exit: the ``forward`` instance attributes, through the observer handles.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .. import edits, pool
from ..attribution import dropout_note
from ..calls import kind_of
from ..errors import AttnScopeError
from ..intercept import Proceed, observe
from ..padded_rows import blank_rows, blank_rows_, query_padding
from ..recompute import additive_mask, causal_additive_mask, softmax_weights
from . import torch_native
from .base import AttentionCall, Recorder
from .sdpa import take_kernel_output

_MHA = nn.MultiheadAttention


@functools.lru_cache(maxsize=64)
def _signature(method: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(method)


def _bind(
    method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = _signature(method).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _padding_from_nested(nested: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad a batch-first nested tensor; return it and a bool mask (True = padding)."""
    lengths = torch.tensor([part.size(0) for part in nested.unbind()], device=nested.device)
    total = int(lengths.max()) if length is None else length
    padded = nested.to_padded_tensor(0.0, (len(lengths), total, nested.size(-1)))
    padding = torch.arange(total, device=nested.device)[None, :] >= lengths[:, None]
    return padded, padding


@dataclass(frozen=True)
class _Projection:
    """What of an ``nn.MultiheadAttention`` the weights depend on (views, or copies to keep)."""

    w_q: Tensor
    w_k: Tensor
    b_q: Tensor | None
    b_k: Tensor | None
    bias_k: Tensor | None
    add_zero_attn: bool
    heads: int
    head_dim: int

    def tensors(self) -> tuple[Tensor | None, ...]:
        return (self.w_q, self.w_k, self.b_q, self.b_k, self.bias_k)

    def with_tensors(self, tensors: list[Tensor | None]) -> _Projection:
        w_q, w_k, b_q, b_k, bias_k = tensors
        assert w_q is not None and w_k is not None
        return replace(self, w_q=w_q, w_k=w_k, b_q=b_q, b_k=b_k, bias_k=bias_k)

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> _Projection:
        """Detached views of ``mha``'s query and key projections."""
        embed = mha.embed_dim
        if mha._qkv_same_embed_dim:
            assert mha.in_proj_weight is not None
            w_q, w_k = mha.in_proj_weight[:embed], mha.in_proj_weight[embed : 2 * embed]
        else:
            w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
        bias = mha.in_proj_bias
        b_q, b_k = (None, None) if bias is None else (bias[:embed], bias[embed : 2 * embed])

        def maybe(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        assert w_q is not None and w_k is not None
        return cls(
            w_q.detach(),
            w_k.detach(),
            maybe(b_q),
            maybe(b_k),
            maybe(mha.bias_k),
            mha.add_zero_attn,
            mha.num_heads,
            mha.head_dim,
        )


def _owned(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Copies of ``tensors`` for a lazy capture, cut from one block of ``pool``, each in the
    memory layout it had (a batch-first input seen as (L, B, E) stays batch-first underneath,
    and a broadcast mask stays a broadcast of its one copy).

    A lazy capture computes from them much later: the caller may change its input or the
    model's parameters (an optimizer step) in place meanwhile. Copies in warm pooled memory
    also leave the model's own allocations as they would have been: holding its activations
    made the allocator map fresh pages every layer (about 300k page faults per forward on a
    BERT-base-shaped encoder at batch 8 and 512 tokens, none without the capture).
    """
    copies = iter(pool.copies(*(t for t in tensors if t is not None)))
    return [None if t is None else next(copies) for t in tensors]


# a lazy capture's mask copies, by (id, as bool) of the mask copied: (mask, its version, copy)
MaskCopies = dict[tuple[int, bool], tuple[Tensor, int, Tensor]]


def _owned_mask(
    mask: Tensor | None, copies: MaskCopies | None, as_bool: bool = False
) -> Tensor | None:
    """A lazy capture's copy of ``mask`` (read as the fused kernel reads it, with ``as_bool``):
    one per mask where ``copies`` is given (one ``nn.TransformerEncoder`` forward, which hands
    every layer the same mask); a copy already made is returned as it is. An inference tensor
    gets a copy per call: without a version counter, a change in place cannot be told apart.
    """
    if mask is None or pool.owns(mask):
        return mask
    shared = None if mask.is_inference() else copies
    key = (id(mask), as_bool)
    hit = None if shared is None else shared.get(key)
    if hit is not None and hit[0] is mask and hit[1] == mask._version:
        return hit[2]
    source = _as_fused_bool(mask) if as_bool else mask
    assert source is not None
    (copy,) = pool.copies(source)
    if shared is not None:
        shared[key] = (mask, mask._version, copy)
    return copy


def mha_call(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    *,
    value: Tensor | None = None,
    **options: Any,
) -> AttentionCall:
    """``_mha_call`` (below); with ``value`` (as given to ``mha``), the call also gives its
    per-head values, for norms."""
    call = _mha_call(mha, query, key, **options)
    if value is not None and not value.is_nested:
        call.values = functools.partial(_mha_values, mha, value)
    return call


def _mha_values(mha: nn.MultiheadAttention, value: Tensor) -> Tensor:
    """The per-head values ``F.multi_head_attention_forward`` computes from ``value``,
    (batch, heads, S, head_dim), ``bias_v`` and ``add_zero_attn``'s key appended."""
    with torch.no_grad():
        embed, heads = mha.embed_dim, mha.num_heads
        if value.dim() == 2:
            value = value.unsqueeze(1)
        elif mha.batch_first:
            value = value.transpose(0, 1)
        if mha._qkv_same_embed_dim:
            assert mha.in_proj_weight is not None
            w_v = mha.in_proj_weight[2 * embed :]
        else:
            w_v = mha.v_proj_weight
        b_v = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * embed :]
        v = F.linear(value, w_v, b_v)
        batch = v.size(1)
        if mha.bias_v is not None:
            v = torch.cat([v, mha.bias_v.to(v.dtype).repeat(1, batch, 1)])
        v = v.view(v.size(0), batch, heads, mha.head_dim).permute(1, 2, 0, 3)
        if mha.add_zero_attn:
            v = torch.cat([v, v.new_zeros(batch, heads, 1, mha.head_dim)], dim=2)
        return v


def _mha_call(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    need_weights: bool = False,
    keep: bool = False,
    kernel_weights: Tensor | None = None,
    kernel_queries: tuple[Tensor, Tensor] | None = None,
    native_kernel: bool = False,
    mask_copies: MaskCopies | None = None,
) -> AttentionCall:
    """Describe one ``mha(query, key, ...)`` call; ``.compute()`` gives (batch, heads, query, key).

    ``keep`` copies what the weights are computed from, for a computation that may run much
    later (a mask once per ``mask_copies``: one encoder forward).
    ``kernel_weights`` are the per-head weights the native kernel computed for this very call
    (see ``torch_native``): they are used, brought to the conventions here (padded query rows
    and fully masked rows zero), instead of a recompute. ``kernel_queries`` are the scaled
    queries and keys it computed, (batch, heads, L, head_dim): the weights are computed from
    them on demand, and nothing else of the module is held. ``native_kernel`` says the call
    ran on MHA's fast path (which applies ``attn_mask`` as given, under an ``is_causal`` hint
    too) though the kernel handed nothing over.

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 8)
    >>> call = mha_call(mha, x, x)
    >>> call.kind, call.shape, tuple(call.compute(torch.tensor([0, 4])).shape)
    ('self', (3, 2, 5, 5), (3, 2, 2, 5))
    """
    self_attention = query is key
    if query.is_nested:  # MHA's native path takes nested self-attention, without masks
        query, key_padding_mask = _padding_from_nested(query)
        key = query
    batched = query.dim() == 3
    if batched and mha.batch_first:
        query_lbe = query.transpose(0, 1)
        key_lbe = query_lbe if self_attention else key.transpose(0, 1)
    elif batched:
        query_lbe, key_lbe = query, key
    else:
        query_lbe, key_lbe = query.unsqueeze(1), key.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    query_len, batch, _ = query_lbe.shape
    key_len = key_lbe.size(0) + int(mha.bias_k is not None) + int(mha.add_zero_attn)
    # The is_causal hint without a mask: the slow path raises, so such a call only completes on
    # PyTorch's fast path, which ignores the hint and attends to every key. Report that.
    hinted = is_causal and attn_mask is not None
    # with the hint, no padding and no weights asked, the slow path lets sdpa mask causally
    use_causal = hinted and key_padding_mask is None and not need_weights and not native_kernel
    kind = kind_of(
        cross=not self_attention and not use_causal,
        causal=use_causal or (self_attention and hinted and not native_kernel),
        hidden=attn_mask if self_attention else None,
    )
    shape = (batch, mha.num_heads, query_len, key_len)
    if kernel_weights is not None and kernel_weights.dim() == 4:
        weights = _conform(kernel_weights, shape, key_padding_mask, attn_mask, self_attention)
        if weights is not None:
            return AttentionCall.of_weights(kind, weights)
    if kernel_queries is not None:  # the kernel used the mask as given, hint or not
        call = _queries_call(kind, shape, kernel_queries, key_padding_mask, attn_mask, mask_copies)
        if call is not None:
            return call
    projection = _Projection.of(mha)
    mask = None if use_causal else attn_mask
    if keep:
        kept = [query_lbe, None if self_attention else key_lbe]
        owned = _owned(kept + list(projection.tensors()))
        own_query, own_key = owned[:2]
        assert own_query is not None
        query_lbe = own_query
        key_lbe = own_query if own_key is None else own_key
        projection = projection.with_tensors(owned[2:])
        key_padding_mask = _owned_mask(key_padding_mask, mask_copies)
        mask = _owned_mask(mask, mask_copies)

    def compute(rows: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return _mha_weights(
                projection,
                query_lbe,
                key_lbe,
                key_padding_mask,
                mask,
                use_causal,
                rows,
                zero_padded_queries=self_attention,
                replace=native_kernel,
            )

    def terms() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            q, k = _mha_terms(projection, query_lbe, key_lbe)
            return q * math.sqrt(1.0 / float(projection.head_dim)), k

    held = tuple(
        t
        for t in (query_lbe, key_lbe, key_padding_mask, mask, *projection.tensors())
        if t is not None
    )
    return AttentionCall(kind, shape, query.dtype, compute, held, terms)


def _queries_call(
    kind: str,
    shape: tuple[int, int, int, int],
    queries: tuple[Tensor, Tensor],
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    mask_copies: MaskCopies | None = None,
) -> AttentionCall | None:
    """A self-attention call from the native kernel's scaled queries and keys (``torch_native``),
    or None when they are not of the expected shape (the caller recomputes)."""
    q, k = queries
    batch, heads, length, keys = shape
    if q.shape[:3] != (batch, heads, length) or k.shape[:3] != (batch, heads, keys):
        return None
    key_padding_mask = _owned_mask(key_padding_mask, mask_copies)
    attn_mask = _owned_mask(attn_mask, mask_copies)

    # the kernel reads both masks as boolean (nonzero hides the key) and never reads a hidden
    # key's score: mirror its masked softmax
    hidden_keys = _as_fused_bool(attn_mask)
    if hidden_keys is not None and hidden_keys.dim() == 3:
        hidden_keys = hidden_keys.view(batch, heads, length, keys)
    padding = _as_fused_bool(key_padding_mask)
    padding = None if padding is None else padding.view(batch, 1, 1, keys)

    def compute(rows: Tensor | None = None) -> Tensor:
        hidden = hidden_keys
        if hidden is not None and rows is not None:
            hidden = hidden[..., rows, :]
        if padding is not None:
            hidden = padding if hidden is None else hidden | padding
        with torch.no_grad():
            # the kernel scaled the queries already
            weights = softmax_weights(q if rows is None else q[:, :, rows], k, 1.0, None, hidden)
        if key_padding_mask is None:
            return weights
        return _zero_padded_rows(weights, key_padding_mask, rows, inplace=True)

    held = tuple(t for t in (q, k, key_padding_mask, attn_mask) if t is not None)
    return AttentionCall(kind, shape, q.dtype, compute, held, lambda: (q, k))


def _conform(
    weights: Tensor,
    shape: tuple[int, int, int, int],
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    self_attention: bool,
) -> Tensor | None:
    """A native kernel's weights (its own buffer, so changed in place) in this module's
    conventions, or None when they are not what was expected (the caller recomputes).

    Nested input gives weights up to the longest sequence only: the rest is padding, zeros.
    """
    batch, heads, queries, keys = weights.shape
    if (batch, heads) != shape[:2] or queries > shape[2] or keys > shape[3]:
        return None
    if key_padding_mask is not None or attn_mask is not None:
        torch.nan_to_num_(weights, nan=0.0)
    if (queries, keys) != shape[2:]:
        weights = F.pad(weights, (0, shape[3] - keys, 0, shape[2] - queries))
    if self_attention and key_padding_mask is not None:
        weights = _zero_padded_rows(weights, key_padding_mask, inplace=True)
    return weights


def _mha_weights(
    p: _Projection,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    causal: bool,
    rows: Tensor | None,
    *,
    zero_padded_queries: bool,
    replace: bool = False,
) -> Tensor:
    """``F.multi_head_attention_forward``'s weights, from (L, B, E) query and (S, B, E) key,
    for every query or only the query positions ``rows``. With ``replace`` (the call ran on
    PyTorch's native kernel, which reads every mask as boolean), a hidden key's score is
    replaced rather than added to, so a NaN or inf input at a hidden key counts for nothing,
    as in the kernel."""
    full_len, batch, _ = query.shape
    if rows is not None:
        query = query[rows]
        if attn_mask is not None:
            attn_mask = attn_mask[rows] if attn_mask.dim() == 2 else attn_mask[:, rows]
    query_len = query.size(0)
    q, k = _mha_terms(p, query, key)
    dtype = q.dtype
    mask = additive_mask(attn_mask, dtype)
    padding = additive_mask(key_padding_mask, dtype)
    extra = int(p.bias_k is not None) + int(p.add_zero_attn)  # keys no mask covers: seen
    if extra:
        mask = None if mask is None else F.pad(mask, (0, extra))
        padding = None if padding is None else F.pad(padding, (0, extra))
    key_len = k.size(2)
    if causal:
        mask = causal_additive_mask(full_len, key_len, dtype, q.device)
        mask = mask if rows is None else mask[rows]
    elif mask is not None:
        mask = mask.view(batch, p.heads, query_len, key_len) if mask.dim() == 3 else mask
    if padding is not None:
        padding = padding.view(batch, 1, 1, key_len)
        mask = padding if mask is None else mask + padding
    scale = math.sqrt(1.0 / float(p.head_dim))
    if replace and mask is not None:  # as the native kernel: a hidden key's score is replaced
        weights = softmax_weights(q, k, scale, None, mask != 0)
    else:
        weights = softmax_weights(q, k, scale, mask)
    if zero_padded_queries and key_padding_mask is not None:
        weights = _zero_padded_rows(weights, key_padding_mask, rows, inplace=True)
    return weights


def _mha_terms(p: _Projection, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """The per-head queries and keys ``F.multi_head_attention_forward`` multiplies, unscaled,
    (batch, heads, L, head_dim) and (batch, heads, S, head_dim) from (L, B, E) and (S, B, E),
    ``bias_k`` and ``add_zero_attn``'s key appended."""
    batch, heads, head_dim = query.size(1), p.heads, p.head_dim
    q = F.linear(query, p.w_q, p.b_q)
    k = F.linear(key, p.w_k, p.b_k)
    if p.bias_k is not None:
        k = torch.cat([k, p.bias_k.to(k.dtype).repeat(1, batch, 1)])
    q = q.view(query.size(0), batch, heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(k.size(0), batch, heads, head_dim).permute(1, 2, 0, 3)
    if p.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
    return q, k


def _zero_padded_rows(
    weights: Tensor, key_padding_mask: Tensor, rows: Tensor | None = None, *, inplace: bool = False
) -> Tensor:
    """``weights`` of a self-attention with the rows of padded queries zero
    (``attnscope.padded_rows``): its queries are its keys, so ``key_padding_mask`` (bool, or
    float with ``-inf`` at padding, as PyTorch takes it) marks them. ``rows`` are the weights'
    query positions (all if None); ``inplace`` for weights this module owns."""
    padding = (
        key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.isneginf()
    )
    keys = padding.size(-1)
    queries = keys if rows is not None else weights.size(2)  # rows pick among all queries
    padded = query_padding(padding, weights.size(0), queries, keys)
    return (blank_rows_ if inplace else blank_rows)(weights, None, padded, rows)


def returned_weights(
    mha: nn.MultiheadAttention, output: Any, bound: dict[str, Any]
) -> Tensor | None:
    """A copy of the per-head weights MHA itself returned, when it returned them before any
    dropout, as (batch, heads, query, key); ``mha_call`` brings them to its conventions."""
    if not (bound["need_weights"] and not bound["average_attn_weights"]):
        return None
    if mha.training and mha.dropout > 0:
        return None
    weights = output[1] if isinstance(output, tuple) and len(output) == 2 else None
    if not isinstance(weights, Tensor):
        return None
    weights = weights.detach().clone()  # the caller's own tensor is left as it was
    return weights.unsqueeze(0) if weights.dim() == 3 else weights


@dataclass
class _EncoderFrame:
    shape: torch.Size
    padding: Tensor | None
    # a lazy capture's mask copies for this forward: every layer gets the same mask
    mask_copies: MaskCopies = field(default_factory=dict)


class TorchNNAdapter:
    """Finds ``nn.MultiheadAttention`` modules and observes them and their fused encoder layers."""

    name = "torch.nn"
    recognises: tuple[str, ...] = ("torch.nn.MultiheadAttention", "torch.nn.Transformer* layers")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in model.named_modules() if isinstance(m, _MHA)}

    def install(
        self,
        model: nn.Module,
        selected: dict[str, nn.Module],
        recorder: Recorder,
        stack: ExitStack,
        keep: Callable[[str], bool] = lambda name: True,
    ) -> None:
        session = _Session(recorder, {id(m): n for n, m in selected.items()})
        torch_native.hold(stack)
        for module in selected.values():
            observe(module, session.observe_mha, stack)
        for module in model.modules():
            if (
                isinstance(module, nn.TransformerEncoderLayer)
                and id(module.self_attn) in session.names
            ):
                observe(module, session.observe_encoder_layer, stack)
            elif isinstance(module, nn.TransformerEncoder):
                observe(module, session.observe_encoder, stack)


class _Session:
    """The state of one capture over one model's PyTorch attention modules."""

    def __init__(self, recorder: Recorder, names: dict[int, str]) -> None:
        self.recorder = recorder
        self.names = names
        self.mha_calls: dict[int, int] = {}
        self.encoders: list[_EncoderFrame] = []

    def _run(
        self, attention: nn.MultiheadAttention, proceed: Proceed
    ) -> tuple[Any, torch_native.Request]:
        """Run the observed module's own forward; return its output and what its native
        kernel computed for ``attention`` (see ``torch_native``): the weights, or for a lazy
        capture (which must not hold L² weights) the scaled queries and keys."""
        with torch_native.requested(attention, queries=self.recorder.keep) as request:
            output = proceed()
        return output, request

    def _mask_copies(self) -> MaskCopies | None:
        """Where a lazy capture may share one copy of a mask: within one forward of the
        innermost ``nn.TransformerEncoder`` (between calls, a mask may be rewritten through
        ``.data``, which no version counter sees)."""
        return self.encoders[-1].mask_copies if self.recorder.keep and self.encoders else None

    def observe_mha(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        bound = _bind(type(module).forward, (module, *args), kwargs)
        assert isinstance(module, _MHA)
        output, kernel = self._run(module, proceed)
        self.mha_calls[id(module)] = self.mha_calls.get(id(module), 0) + 1
        # weights MHA returned itself, or that its native kernel computed: no recompute
        given = returned_weights(module, output, bound)
        call = mha_call(
            module,
            bound["query"],
            bound["key"],
            value=bound["value"] if self.recorder.wants_outputs else None,
            key_padding_mask=bound["key_padding_mask"],
            attn_mask=_knocked_out(module, bound["query"], bound["key"], bound["attn_mask"]),
            is_causal=bound["is_causal"],
            need_weights=bound["need_weights"],
            keep=self.recorder.keep,
            mask_copies=self._mask_copies(),
            kernel_weights=kernel.weights if given is None else given,
            kernel_queries=kernel.qk,
            native_kernel=kernel.native,
        )
        if self.recorder.wants_outputs:
            ran = take_kernel_output(module)  # its Python path's sdpa call: values, output
            if module.training and module.dropout > 0:
                call.grad_note = dropout_note(module.dropout)
            elif ran is not None and ran[1].dim() == 4:
                value, call.output = ran
                call.values = lambda: value
        self.recorder.record(self.names[id(module)], call)
        return output

    def observe_encoder_layer(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        assert isinstance(module, nn.TransformerEncoderLayer)
        attention = module.self_attn
        calls_before = self.mha_calls.get(id(attention), 0)
        output, kernel = self._run(attention, proceed)
        if self.mha_calls.get(id(attention), 0) != calls_before:
            return output  # the slow path called self_attn, which recorded itself
        try:
            bound = _bind(nn.TransformerEncoderLayer.forward, (module, *args), kwargs)
        except TypeError as error:
            raise AttnScopeError(
                f"{type(module).__name__} ran without calling its self_attn and its forward "
                f"takes arguments attnscope cannot map ({error}); capture its attention module "
                "directly or keep nn.TransformerEncoderLayer.forward's signature"
            ) from error
        outer = self.encoders[-1] if self.encoders else None
        call = encoder_layer_call(
            module,
            bound["src"],
            bound["src_mask"],
            bound["src_key_padding_mask"],
            outer,
            keep=self.recorder.keep,
            mask_copies=self._mask_copies(),
            kernel_weights=kernel.weights,
            kernel_queries=kernel.qk,
            native_kernel=kernel.native,
            values=self.recorder.wants_outputs,
        )
        self.recorder.record(self.names[id(attention)], call)
        return output

    def observe_encoder(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], proceed: Proceed
    ) -> Any:
        bound = _bind(nn.TransformerEncoder.forward, (module, *args), kwargs)
        src, padding = bound["src"], bound["src_key_padding_mask"]
        padding = _as_fused_bool(padding)  # the nested path pads wherever the mask is nonzero
        self.encoders.append(_EncoderFrame(src.shape, padding))
        try:
            return proceed()
        finally:
            self.encoders.pop()


def _knocked_out(
    mha: nn.Module, query: Tensor, key: Tensor, attn_mask: Tensor | None
) -> Tensor | None:
    """``attn_mask`` with the edges a knockout hides from ``mha`` (``attnscope.edits``): what
    its Python path gave the kernel, so the recompute reads the same mask."""
    knocked = edits.edges_of(mha)
    if not knocked or query.is_nested:
        return attn_mask
    batch_first = getattr(mha, "batch_first", False) and query.dim() == 3
    queries, keys = (query.size(1), key.size(1)) if batch_first else (query.size(0), key.size(0))
    hidden = edits.edge_mask("", knocked, queries, keys, query.device)
    if attn_mask is None:
        return torch.zeros(hidden.shape, dtype=query.dtype, device=query.device).masked_fill_(
            hidden, float("-inf")
        )
    if attn_mask.dtype == torch.bool:
        return attn_mask | hidden
    return attn_mask.masked_fill(hidden, float("-inf"))


def _as_fused_bool(mask: Tensor | None) -> Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


def encoder_layer_call(
    layer: nn.TransformerEncoderLayer,
    src: Tensor,
    src_mask: Tensor | None,
    src_key_padding_mask: Tensor | None,
    outer: _EncoderFrame | None = None,
    *,
    keep: bool = False,
    kernel_weights: Tensor | None = None,
    kernel_queries: tuple[Tensor, Tensor] | None = None,
    mask_copies: MaskCopies | None = None,
    native_kernel: bool = False,
    values: bool = False,
) -> AttentionCall:
    """The self-attention of an encoder layer as its slow path would have computed it (with
    ``values``, its per-head values too).

    On the nested-tensor path the layer sees neither padding nor the padded length; ``outer``
    (the enclosing ``nn.TransformerEncoder`` call) gives both back.
    """
    # The fused kernel reads every mask as boolean: any nonzero entry hides that key (measured
    # on torch 2.13: a general float mask changes its output that way). Mirror what it ran.
    if keep:  # converted and copied once per mask and capture
        src_mask = _owned_mask(src_mask, mask_copies, as_bool=True)
        src_key_padding_mask = _owned_mask(src_key_padding_mask, mask_copies, as_bool=True)
    else:
        src_mask = _as_fused_bool(src_mask)
        src_key_padding_mask = _as_fused_bool(src_key_padding_mask)
    if src.is_nested:
        if outer is not None and outer.padding is not None:
            src = src.to_padded_tensor(0.0, outer.shape)
            src_key_padding_mask = outer.padding
        else:
            src, src_key_padding_mask = _padding_from_nested(src)
    attention_input = src
    if layer.norm_first and ((kernel_weights is None and kernel_queries is None) or values):
        with torch.no_grad():
            attention_input = layer.norm1(src)
    if kernel_weights is None and kernel_queries is None:
        src = attention_input
    # The fused kernel uses src_mask as given and ignores the is_causal hint: mirror it.
    return mha_call(
        layer.self_attn,
        src,
        src,
        value=attention_input if values else None,
        key_padding_mask=src_key_padding_mask,
        attn_mask=src_mask,
        is_causal=False,
        need_weights=False,
        keep=keep,
        kernel_weights=kernel_weights,
        kernel_queries=kernel_queries,
        mask_copies=mask_copies,
        native_kernel=native_kernel,
    )
