"""Seed-compatible layers: ``nn.Transformer*Layer`` subclasses that keep their attention weights.

Drop-in replacements (same constructor, same ``state_dict`` keys) that store per-head weights,
(batch, heads, query, key), detached, after every forward in every mode. The encoder layer keeps
PyTorch's fused fast path: when it runs, ``_sa_block`` is skipped and the weights come from the
fused kernel itself on the CPU, or are recomputed from the layer's input elsewhere, exactly as
``attnscope.capture`` does (see ``attnscope.adapters.torch_native``).

Turn storing off for a training loop with ``layer.store_attn_weights = False`` (or
``set_store_attn_weights(model, False)`` for every such layer in a model).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .adapters import torch_native
from .adapters.torch_nn import encoder_layer_call, mha_call


def _weights(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
) -> Tensor:
    """The weights of ``mha(query, key, ...)`` as the block's own call computes them."""
    call = mha_call(
        mha, query, key, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
    )
    return call.compute(None).detach()


class TransformerEncoderLayerWithAttn(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that keeps ``attn_weights`` after every forward.

    >>> import torch
    >>> layer = TransformerEncoderLayerWithAttn(16, 4, batch_first=True).eval()
    >>> with torch.no_grad():
    ...     _ = layer(torch.randn(2, 5, 16))
    >>> tuple(layer.attn_weights.shape)
    (2, 4, 5, 5)
    """

    attn_weights: Tensor | None = None
    store_attn_weights: bool = True

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if not self.store_attn_weights:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        self._sa_ran = False
        deactivate = torch_native.activate()
        try:
            with torch_native.requested(self.self_attn) as request:
                output = super().forward(src, src_mask, src_key_padding_mask, is_causal)
        finally:
            deactivate()
        if not self._sa_ran:  # the fused path skipped _sa_block
            call = encoder_layer_call(
                self, src, src_mask, src_key_padding_mask, kernel_weights=request.weights
            )
            self.attn_weights = call.compute(None).detach()
        return output

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        self._sa_ran = True
        if self.store_attn_weights:
            self.attn_weights = _weights(
                self.self_attn, x, x, attn_mask, key_padding_mask, is_causal
            )
        return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)


class TransformerDecoderLayerWithAttn(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` that keeps ``self_attn_weights`` and ``cross_attn_weights``.

    >>> import torch
    >>> layer = TransformerDecoderLayerWithAttn(16, 4, batch_first=True)
    >>> _ = layer(torch.randn(2, 3, 16), torch.randn(2, 7, 16))
    >>> tuple(layer.self_attn_weights.shape), tuple(layer.cross_attn_weights.shape)
    ((2, 4, 3, 3), (2, 4, 3, 7))
    """

    self_attn_weights: Tensor | None = None
    cross_attn_weights: Tensor | None = None
    store_attn_weights: bool = True

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        if self.store_attn_weights:
            self.self_attn_weights = _weights(
                self.self_attn, x, x, attn_mask, key_padding_mask, is_causal
            )
        return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)

    def _mha_block(
        self,
        x: Tensor,
        mem: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        if self.store_attn_weights:
            self.cross_attn_weights = _weights(
                self.multihead_attn, x, mem, attn_mask, key_padding_mask, is_causal
            )
        return super()._mha_block(x, mem, attn_mask, key_padding_mask, is_causal)


def set_store_attn_weights(model: nn.Module, store: bool) -> None:
    """Switch weight storing on or off for every seed-compatible layer in ``model``."""
    for module in model.modules():
        if isinstance(module, TransformerEncoderLayerWithAttn | TransformerDecoderLayerWithAttn):
            module.store_attn_weights = store
            if not store:
                module.__dict__.pop("attn_weights", None)
                module.__dict__.pop("self_attn_weights", None)
                module.__dict__.pop("cross_attn_weights", None)


__all__: list[Any] = [
    "TransformerDecoderLayerWithAttn",
    "TransformerEncoderLayerWithAttn",
    "set_store_attn_weights",
]
