"""Hugging Face transformers' conventions, in one place: what the kernel adapters read of them.

Design note
-----------
attnscope never imports transformers; it reads what a Hugging Face model carries, by name, and
everything that is specific to that library is here, so the kernel adapters (sdpa, softmax,
flex) stay about kernels:

- ``attention_mask`` (and, in an encoder-decoder, ``decoder_attention_mask``) given to the
  model says which query positions are padding, per part of the model (``padding_scopes``);
- an attention module called with ``key_value_states`` / ``encoder_hidden_states`` /
  ``cross_attention_states`` is cross-attention (``is_cross``);
- ``config._attn_implementation`` names the kernel (``implementation``); an ``eager`` module
  returns its weights as the last (batch, heads, query, key) sub-stochastic tensor of its
  output (``eager_weights``), rows below 1 where a sink takes part;
- modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (``DISPATCH``), so a forward naming it
  attends whatever its class is called;
- one decoding step's grouped-query heads may be packed into the query axis
  (``packed_gqa_groups``);
- head counts live on the module or its ``config`` under a few names (``head_count``);
- Longformer's (and LED's) sliding-window softmax is a band, (batch, query, heads, 2w + 1),
  key ``i + j - w`` for query ``i``: ``dense_band`` lays it out as (batch, heads, query, key),
  zero outside the window; with global attention (extra leading columns) it is left unmapped;
- LongT5's local attention is blocked, (batch, blocks, heads, L, 3L), each block of L queries
  over the block before, its own and the one after: ``dense_blocks`` lays it out the same way;
- PEGASUS-X's local attention is blocked too, (batch, heads, blocks, L, G + L), each block's
  queries over the G global tokens and their own block: ``dense_global_local`` lays it out
  over [globals; sequence] keys, (batch, heads, sequence, G + sequence), beside its global
  tokens' own map (batch, heads, G, G + sequence).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..padded_rows import padding_of

CROSS_ARGUMENTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")
DISPATCH = "ALL_ATTENTION_FUNCTIONS"


def is_cross(given: dict[str, Any], module: nn.Module) -> bool:
    """Whether a call of ``module`` with arguments ``given`` (by name) is cross-attention."""
    return any(given.get(k) is not None for k in CROSS_ARGUMENTS) or bool(
        attribute(module, "is_cross_attention", False)
    )


def cross_states(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The other sequence a call of ``module`` attends to (``encoder_hidden_states``, ...),
    passed by keyword or by position, or None. The positions are read from the forward's
    signature once (binding every call cost about 20 us, at every decoding step's layers).

    >>> class Cross(nn.Module):
    ...     def forward(self, hidden_states, encoder_hidden_states=None): ...
    >>> cross_states(Cross(), (1, 2), {}), cross_states(Cross(), (1,), {}) is None
    (2, True)
    """
    for name in CROSS_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    for position in _cross_positions(type(module).forward):
        if position < len(args) and args[position] is not None:
            return args[position]
    return None


@functools.lru_cache(maxsize=1024)
def _cross_positions(forward: Callable[..., Any]) -> tuple[int, ...]:
    """Where in a call's positional arguments (``self`` left out) the forward takes a
    ``CROSS_ARGUMENTS`` one, in their order."""
    try:
        parameters = list(signature(forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    positional = [
        p.name
        for p in parameters[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return tuple(positional.index(n) for n in CROSS_ARGUMENTS if n in positional)


HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_attn_heads", "n_heads", "n_head", "heads")


def head_count(module: nn.Module) -> int | None:
    """The module's head count, under one of the names modules give it, or its config's."""
    for owner in (module, attribute(module, "config", None)):
        for name in HEAD_COUNTS:
            value = attribute(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def padding_scopes(model: nn.Module, names: dict[int, str]) -> dict[str, str]:
    """Which of a Hugging Face model's arguments says which modules' padding: its
    ``attention_mask`` covers every module, or, in an encoder-decoder, the encoder's, and its
    ``decoder_attention_mask`` the decoder's (by module-name prefix)."""
    config = getattr(model, "config", None)
    if config is None or "attention_mask" not in signature(type(model).forward).parameters:
        return {}
    if not getattr(config, "is_encoder_decoder", False):
        return {"attention_mask": ""}
    scopes = {}
    for argument, getter in (
        ("attention_mask", "get_encoder"),
        ("decoder_attention_mask", "get_decoder"),
    ):
        try:
            part = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(part, nn.Module) and id(part) in names and names[id(part)]:
            scopes[argument] = names[id(part)]
    return scopes


@functools.lru_cache(maxsize=256)
def signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


def arguments(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    try:
        return dict(signature(function).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


PYTORCH_PADDING = ("src_key_padding_mask", "key_padding_mask")  # True (or nonzero) = padding


def given_paddings(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], names: Iterable[str]
) -> dict[str, Tensor]:
    """The paddings this call of ``module``'s forward gives under ``names``, by keyword or by
    position, each (batch, length) bool, True at padding: a Hugging Face style 2-D mask (1 =
    keep, ``padding_of``), or, under PyTorch's names (``PYTORCH_PADDING``), a key padding
    mask (True = padding). Names the call leaves out, or gives no 2-D mask, are left out. The
    one reading of a model's padding arguments: captures and ablations both ask it.

    >>> class Model(nn.Module):
    ...     def forward(self, input_ids, attention_mask=None, src_key_padding_mask=None):
    ...         return input_ids
    >>> given_paddings(Model(), (None, torch.tensor([[1, 0]])), {}, ["attention_mask"])
    {'attention_mask': tensor([[False,  True]])}
    >>> pad = {"src_key_padding_mask": torch.tensor([[0.0, 1.0]])}
    >>> given_paddings(Model(), (None,), pad, PYTORCH_PADDING)
    {'src_key_padding_mask': tensor([[False,  True]])}
    """
    bound = arguments(type(module).forward, (module, *args), kwargs)
    found: dict[str, Tensor] = {}
    for name in names:
        value = bound.get(name)
        if name not in PYTORCH_PADDING:
            padding = padding_of(value)
        elif isinstance(value, Tensor) and value.dim() == 2:
            padding = value if value.dtype == torch.bool else value != 0
        else:
            padding = None
        if padding is not None:
            found[name] = padding
    return found


def implementation(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def eager_weights(output: Any) -> Tensor | None:
    """The last 4-D tensor in a module's output whose rows are sub-distributions (eager
    weights: non-negative, each row summing to at most 1, below 1 where a sink takes part), as
    the module returned it (on the autograd graph, for gradients)."""
    if not isinstance(output, tuple):
        return None
    for item in reversed(output):
        if isinstance(item, Tensor) and item.dim() == 4 and item.is_floating_point():
            values = item.detach().float()
            # rows may sum below 1: attention sinks take their share outside the keys
            sums = values.sum(-1)
            if bool((values >= 0).all()) and bool((sums < 1 + 1e-3).all()):
                return item
    return None


def packed_gqa_groups(module: nn.Module | None, query: Tensor, key: Tensor) -> bool:
    """Hugging Face packs one decoding step's query heads into the query axis (``pack_gqa``)."""
    if query.size(-2) < 2 or query.size(1) != key.size(1):  # the tensors first: cheaper
        return False
    groups = attribute(module, "num_key_value_groups", 1)
    if not isinstance(groups, int) or groups < 2 or query.size(-2) != groups:
        return False
    heads = attribute(attribute(module, "config", None), "num_attention_heads", None)
    return heads is not None and query.size(1) * groups == heads


def attribute(owner: object, name: str, default: Any) -> Any:
    """``getattr`` that also survives configs whose properties raise other errors (a per-layer
    config refuses a global ``num_attention_heads`` with its own exception)."""
    if owner is None:
        return default
    try:
        return getattr(owner, name, default)
    except Exception:
        return default


def dense_layout(
    module: nn.Module, weights: Tensor, given: dict[str, Any], length: int | None
) -> Tensor | None:
    """A windowed or blocked softmax over its last axis (``dense_band``, ``dense_blocks``,
    ``dense_global_local``) as a (batch, heads, query, key) map, or None."""
    dense = dense_band(module, weights, given)
    if dense is None:
        dense = dense_blocks(module, weights, length)
    if dense is None:
        dense = dense_global_local(module, weights)
    return dense


def dense_band(module: nn.Module, weights: Tensor, given: dict[str, Any]) -> Tensor | None:
    """A sliding-window softmax (batch, query, heads, 2w + 1) of a module with
    ``one_sided_attn_window_size`` w as a (batch, heads, query, key) map, zero outside each
    query's window and on the rows ``is_index_masked`` (its padding) marks; None for anything
    else (global attention adds leading columns that this layout does not have)."""
    w = attribute(module, "one_sided_attn_window_size", None)
    if not isinstance(w, int) or weights.dim() != 4:
        return None
    batch, queries, heads, width = weights.shape
    if width != 2 * w + 1 or heads != head_count(module):
        return None
    band = weights.detach().permute(0, 2, 1, 3)  # (batch, heads, query, offset)
    positions = torch.arange(queries, device=weights.device)[:, None] + torch.arange(width)
    padded = band.new_zeros(batch, heads, queries, queries + 2 * w)  # keys shifted by w
    padded.scatter_(-1, positions.expand(batch, heads, queries, width), band)
    dense = padded[..., w : w + queries]
    masked = given.get("is_index_masked")
    if isinstance(masked, Tensor) and masked.shape == (batch, queries):
        dense = dense.masked_fill(masked[:, None, :, None], 0.0)
    return dense.contiguous()


def dense_blocks(module: nn.Module, weights: Tensor, length: int | None) -> Tensor | None:
    """A blocked local softmax (batch, blocks, heads, L, 3L) of a module with ``block_len`` L,
    block n's queries over the blocks n - 1, n and n + 1, as a (batch, heads, query, key) map
    over the first ``length`` positions (the module's input; the blocks pad it), zero outside
    each query's three blocks; None for anything else."""
    size = attribute(module, "block_len", None)
    if not isinstance(size, int) or weights.dim() != 5:
        return None
    batch, blocks, heads, queries, keys = weights.shape
    if queries != size or keys != 3 * size or heads != head_count(module):
        return None
    padded = weights.new_zeros(batch, heads, blocks * size, (blocks + 2) * size)
    for n in range(blocks):  # keys shifted by one block: block n - 1 starts at column n * L
        padded[:, :, n * size : (n + 1) * size, n * size : (n + 3) * size] = weights[:, n].detach()
    dense = padded[..., size : size + blocks * size]
    if length is not None and 0 < length <= blocks * size:
        dense = dense[:, :, :length, :length]
    return dense.contiguous()


def dense_global_local(module: nn.Module, weights: Tensor) -> Tensor | None:
    """A blocked local softmax (batch, heads, blocks, L, G + L) of a module with ``block_size``
    L, block n's queries over G global tokens then their own block, as (batch, heads, blocks·L,
    G + blocks·L) over [globals; sequence] keys, zero outside each query's block; None for
    anything else."""
    size = attribute(module, "block_size", None)
    if not isinstance(size, int) or weights.dim() != 5:
        return None
    batch, heads, blocks, queries, keys = weights.shape
    extra = keys - size
    if queries != size or extra < 0 or heads != head_count(module):
        return None
    weights = weights.detach()
    length = blocks * size
    dense = weights.new_zeros(batch, heads, length, extra + length)
    dense[..., :extra] = weights[..., :extra].reshape(batch, heads, length, extra)
    for n in range(blocks):
        rows = slice(n * size, (n + 1) * size)
        dense[:, :, rows, extra + n * size : extra + (n + 1) * size] = weights[:, :, n, :, extra:]
    return dense
