"""Seed-compatible layers: ``nn.Transformer*Layer`` subclasses that keep their attention weights.

Drop-in replacements for the subclasses attnscope grew from (same constructor, same
``state_dict`` keys, the same attribute names): after every forward, in every mode, the encoder
layer has ``attn_weights`` and the decoder layer ``attn_weights`` (its masked self-attention,
as in the original), ``self_attn_weights`` (the same tensor) and ``cross_attn_weights``, each
(batch, heads, query, key), per head, never averaged.

Design note
-----------
What the forward keeps. The layers run PyTorch's own forward unchanged (``need_weights`` stays
False, so the kernel and the output are those of ``nn.Transformer*Layer``). In ``_sa_block``
/ ``_mha_block`` they keep only what the weights are computed from: copies of the block's
query and key inputs, of the query and key projections and of the masks (pooled memory, see
``attnscope.pool``), so a later optimizer step, an input buffer reused in place or
``load_state_dict`` change nothing. The weights are computed the first time the attribute is
read, exactly as ``attnscope.capture`` computes them (``softmax((q·scale) kᵀ + mask)`` from
those inputs, as ``F.multi_head_attention_forward`` does), and then kept. A training loop
that never reads them pays for the copies only. When the encoder's fused path runs
(eval + ``no_grad``), ``_sa_block`` is skipped: on the CPU the fused kernel's own weights are
kept (it computes them anyway), elsewhere the layer input is kept and recomputed from on
read, as ``attnscope.capture`` does (see ``attnscope.adapters.torch_native``).

What the weights are. Those before dropout, detached, in every mode. The original subclasses
returned ``self_attn(..., need_weights=True)``'s weights: in train mode those are after
dropout and carry the graph. To train through the weights (an attention loss, say), set
``layer.keep_attn_graph = True``: each forward with grad enabled then computes them from the
live inputs and parameters (``F.multi_head_attention_forward`` with ``need_weights=True`` and no
dropout, so the model's own output and random stream are untouched), not detached, still
before dropout. That costs one more attention per block.

Turn storing off with ``layer.store_attn_weights = False`` (or
``set_store_attn_weights(model, False)``): nothing is kept, and reading the weights raises
``AttnScopeError`` instead of giving ``None``. Before the first forward they are ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .adapters import torch_native
from .adapters.torch_nn import _zero_padded_rows, encoder_layer_call, mha_call
from .errors import AttnScopeError

_SELF, _CROSS = "self", "cross"


def _weights(slot: str, attribute: str, doc: str) -> Any:
    """A kept-weights attribute of a seed layer (None before any forward), computed when read;
    assigning to it keeps the value given, as the original subclasses' attributes did."""

    def read(layer: Any) -> Tensor | None:
        return layer._read(slot, attribute)

    def keep(layer: Any, value: Tensor | None) -> None:
        layer._keep(slot, value)

    return property(read, keep, doc=doc + " None before any forward.")


class _Projection:
    """What ``mha_call`` reads of an ``nn.MultiheadAttention``, with copies of its query and key
    projections: the parameters may change (an optimizer step) before the weights are read.
    Copied at every forward: neither fused optimizers (``Adam(fused=True)``) nor writes
    through ``.data`` bump a parameter's version counter, so an unchanged version proves
    nothing."""

    __slots__ = (
        "_qkv_same_embed_dim",
        "add_zero_attn",
        "batch_first",
        "bias_k",
        "embed_dim",
        "head_dim",
        "in_proj_bias",
        "in_proj_weight",
        "k_proj_weight",
        "num_heads",
        "q_proj_weight",
    )

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        embed = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = embed, mha.num_heads, mha.head_dim
        self.batch_first, self.add_zero_attn = mha.batch_first, mha.add_zero_attn
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        qk = slice(0, 2 * embed)  # the value projection is not needed
        self.in_proj_weight = _copy(mha.in_proj_weight, qk)
        self.q_proj_weight = _copy(mha.q_proj_weight)
        self.k_proj_weight = _copy(mha.k_proj_weight)
        self.in_proj_bias = _copy(mha.in_proj_bias, qk)
        self.bias_k = _copy(mha.bias_k)


def _copy(param: Tensor | None, part: slice | None = None) -> Tensor | None:
    if param is None:
        return None
    return (param.detach() if part is None else param.detach()[part]).clone()


class _Pending:
    """One block's attention call, kept to be computed on read: the query, key and masks as
    the block got them (with their version counters: a change in place is refused, not
    silently computed from) and a copy of the projection."""

    __slots__ = ("_args", "_projection", "_versions")

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        query: Tensor,
        key: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> None:
        self._projection = _Projection(mha)
        self._args = (query.detach(), key.detach(), attn_mask, key_padding_mask, is_causal)
        if query is key:
            self._args = (self._args[0], self._args[0], *self._args[2:])
        self._versions = [_version(t) for t in self._tensors()]

    def _tensors(self) -> list[Tensor]:
        return [t for t in self._args[:4] if isinstance(t, Tensor)]

    def __call__(self) -> Tensor:
        for tensor, version in zip(self._tensors(), self._versions, strict=True):
            if _version(tensor) != version:
                raise AttnScopeError(
                    "an input or mask of this layer's attention was changed in place after its "
                    "forward, so its weights can no longer be computed: read them before "
                    "changing it (or pass a new tensor)"
                )
        query, key, attn_mask, key_padding_mask, is_causal = self._args
        call = mha_call(
            self._projection,  # type: ignore[arg-type]  # reads the same attributes
            query,
            key,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )
        return call.compute(None)


def _version(t: Tensor) -> int | None:
    # an inference tensor has no version counter (and changes only inside inference_mode)
    return None if t.is_inference() else t._version


Lazy = Callable[[], Tensor]
_Stored = Tensor | Lazy | None


def weights_with_graph(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Per-head weights of ``mha(query, key, key, ...)`` before dropout, with their graph.

    PyTorch's slow path (``F.multi_head_attention_forward`` with ``need_weights=True`` and
    dropout 0) on the live parameters, as (batch, heads, query, key), rows of padded queries
    (self-attention) and fully masked rows zero, as everywhere in attnscope.

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 8)
    >>> w = weights_with_graph(mha, x, x)
    >>> tuple(w.shape), w.requires_grad
    ((3, 2, 5, 5), True)
    """
    self_attention = query is key
    batched = query.dim() == 3
    if batched and mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    separate = not mha._qkv_same_embed_dim
    _, weights = F.multi_head_attention_forward(
        query,
        key,
        key,
        mha.embed_dim,
        mha.num_heads,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        0.0,
        mha.out_proj.weight,
        mha.out_proj.bias,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=True,
        attn_mask=attn_mask,
        use_separate_proj_weight=separate,
        q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None,
        v_proj_weight=mha.v_proj_weight if separate else None,
        average_attn_weights=False,
        is_causal=is_causal,
    )
    assert weights is not None
    if not batched:
        weights = weights.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if attn_mask is not None or key_padding_mask is not None:
        weights = torch.nan_to_num(weights, nan=0.0)
    if self_attention and key_padding_mask is not None:
        positions = torch.arange(weights.size(2), device=weights.device)
        weights = _zero_padded_rows(weights, key_padding_mask, positions)
    return weights


class _KeepsWeights:
    """What both layers share: the stored weights, computed on first read."""

    store_attn_weights: bool = True
    keep_attn_graph: bool = False

    def _keep(self, slot: str, value: _Stored) -> None:
        store = self.__dict__.get("_attn_store")
        if store is None:
            store = self.__dict__["_attn_store"] = {}
        store[slot] = value

    def _keep_call(
        self,
        slot: str,
        mha: nn.MultiheadAttention,
        query: Tensor,
        key: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> None:
        if not self.store_attn_weights:
            return
        value: _Stored
        if self.keep_attn_graph and torch.is_grad_enabled():
            value = weights_with_graph(mha, query, key, attn_mask, key_padding_mask, is_causal)
        else:
            value = _Pending(mha, query, key, attn_mask, key_padding_mask, is_causal)
        self._keep(slot, value)

    def _read(self, slot: str, attribute: str) -> Tensor | None:
        if not self.store_attn_weights:
            raise AttnScopeError(
                f"{type(self).__name__}.{attribute} is not kept: store_attn_weights is False "
                "on this layer. Set layer.store_attn_weights = True (or "
                "attnscope.layers.set_store_attn_weights(model, True)) and run a forward to "
                "read it"
            )
        store = self.__dict__.get("_attn_store")
        value = None if store is None else store.get(slot)
        if value is None or isinstance(value, Tensor):
            return value
        weights = value().detach()
        self._keep(slot, weights)
        return weights

    def _forget(self) -> None:
        self.__dict__.pop("_attn_store", None)

    def __getstate__(self) -> dict[str, Any]:
        # pickling and deepcopy: weights not read yet are computed (a closure cannot be pickled)
        store = self.__dict__.get("_attn_store") or {}
        for slot, value in list(store.items()):
            if value is not None and not isinstance(value, Tensor):
                store[slot] = value().detach()
        return super().__getstate__()  # type: ignore[misc]


class TransformerEncoderLayerWithAttn(_KeepsWeights, nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that keeps ``attn_weights`` after every forward.

    (batch, heads, query, key) before dropout and detached; ``keep_attn_graph = True`` keeps
    the graph (see the module's note). Computed when first read.

    >>> import torch
    >>> layer = TransformerEncoderLayerWithAttn(16, 4, batch_first=True).eval()
    >>> with torch.no_grad():
    ...     _ = layer(torch.randn(2, 5, 16))
    >>> tuple(layer.attn_weights.shape)
    (2, 4, 5, 5)
    """

    attn_weights = _weights(
        _SELF, "attn_weights", "The self-attention's per-head weights of the last forward."
    )

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if not self.store_attn_weights:
            self._forget()
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        weight = self.self_attn.in_proj_weight
        if self.training or (
            torch.is_grad_enabled() and weight is not None and weight.requires_grad
        ):  # the fused path cannot run: _sa_block will
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        self._sa_ran = False
        deactivate = torch_native.activate()
        try:
            with torch_native.requested(self.self_attn) as request:
                output = super().forward(src, src_mask, src_key_padding_mask, is_causal)
        finally:
            deactivate()
        if not self._sa_ran:  # the fused path skipped _sa_block
            kernel = request.weights
            call = encoder_layer_call(
                self,
                src,
                src_mask,
                src_key_padding_mask,
                keep=kernel is None,
                kernel_weights=kernel,
            )
            self._keep(_SELF, lambda: call.compute(None))
        return output

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        self._sa_ran = True
        self._keep_call(_SELF, self.self_attn, x, x, attn_mask, key_padding_mask, is_causal)
        return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)


class TransformerDecoderLayerWithAttn(_KeepsWeights, nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` that keeps its weights after every forward.

    ``attn_weights`` is the masked self-attention, as in the original subclass;
    ``self_attn_weights`` is the same tensor and ``cross_attn_weights`` the attention to the
    memory. Each (batch, heads, query, key) before dropout and detached
    (``keep_attn_graph = True`` keeps the graph), computed when first read.

    >>> import torch
    >>> layer = TransformerDecoderLayerWithAttn(16, 4, batch_first=True)
    >>> _ = layer(torch.randn(2, 3, 16), torch.randn(2, 7, 16))
    >>> tuple(layer.self_attn_weights.shape), tuple(layer.cross_attn_weights.shape)
    ((2, 4, 3, 3), (2, 4, 3, 7))
    >>> layer.attn_weights is layer.self_attn_weights
    True
    """

    attn_weights = _weights(
        _SELF, "attn_weights", "The masked self-attention's per-head weights of the last forward."
    )
    self_attn_weights = _weights(_SELF, "self_attn_weights", "The same tensor as attn_weights.")
    cross_attn_weights = _weights(
        _CROSS, "cross_attn_weights", "The attention to the memory's weights of the last forward."
    )

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        if not self.store_attn_weights:
            self._forget()
        return super().forward(
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
        )

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        self._keep_call(_SELF, self.self_attn, x, x, attn_mask, key_padding_mask, is_causal)
        return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)

    def _mha_block(
        self,
        x: Tensor,
        mem: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        self._keep_call(_CROSS, self.multihead_attn, x, mem, attn_mask, key_padding_mask, is_causal)
        return super()._mha_block(x, mem, attn_mask, key_padding_mask, is_causal)


def set_store_attn_weights(model: nn.Module, store: bool) -> None:
    """Switch weight storing on or off for every seed-compatible layer in ``model``."""
    for module in model.modules():
        if isinstance(module, _KeepsWeights):
            module.store_attn_weights = store
            if not store:
                module._forget()


__all__: list[Any] = [
    "TransformerDecoderLayerWithAttn",
    "TransformerEncoderLayerWithAttn",
    "set_store_attn_weights",
    "weights_with_graph",
]
