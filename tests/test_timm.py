"""timm models, with their attention's ``fused_attn`` on and off, captured exactly.

timm's attention modules choose their kernel by an instance flag, ``fused_attn``: on, they
call ``F.scaled_dot_product_attention`` and never hold the weights; off, they compute
``softmax(q kᵀ · scale + bias)`` themselves. Each model here is built at test size with random
weights (``pretrained=False``, nothing is downloaded), run in both modes, and checked twice:
the captured forward's output is ``torch.equal`` to the uncaptured one (the same kernel ran),
and every captured map equals an independent reference computed by hand from the inputs a
forward pre-hook saw and the module's own projection weights, biases and position tables.

timm imports torchvision at import time; where either is missing or torchvision was built for
another torch (its CUDA wheel beside a CPU torch raises RuntimeError), the module is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import attnscope
from reference import assert_weights_match

try:
    timm = pytest.importorskip("timm")
except RuntimeError as error:  # a torchvision built for another torch (a CUDA wheel on CPU torch)
    pytest.skip(f"timm does not import here: {error}", allow_module_level=True)

from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.models.beit import Attention as BeitAttention
from timm.models.cait import ClassAttn, TalkingHeadAttn
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention
from timm.models.xcit import XCA

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _heads(t: Tensor, heads: int) -> Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim)."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    q, k, _ = qkv.chunk(3, dim=-1)
    return _heads(q, heads), _heads(k, heads)


def _qkv_bias(module: nn.Module) -> Tensor | None:
    if getattr(module, "q_bias", None) is None:
        return module.qkv.bias
    return torch.cat((module.q_bias, torch.zeros_like(module.q_bias), module.v_bias))


def _relative_bias(module: nn.Module, tokens: int) -> Tensor:
    """(1, heads, tokens, tokens) from the module's relative position table and index."""
    table, index = module.relative_position_bias_table, module.relative_position_index
    return table[index.reshape(-1)].reshape(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)


def _softmax(scores: Tensor) -> Tensor:
    return torch.softmax(scores.double(), dim=-1).float()


def _vit(module: Attention, inputs: Inputs) -> Tensor:
    (x,), kwargs = inputs
    assert kwargs.get("attn_mask") is None and not kwargs.get("is_causal")
    q, k = _split_qkv(F.linear(x, module.qkv.weight, module.qkv.bias), module.num_heads)
    q, k = module.q_norm(q), module.k_norm(k)
    return _softmax(q @ k.transpose(-2, -1) * module.scale)


def _beit(module: BeitAttention, inputs: Inputs) -> Tensor:
    (x,), kwargs = inputs
    q, k = _split_qkv(F.linear(x, module.qkv.weight, _qkv_bias(module)), module.num_heads)
    scores = q @ k.transpose(-2, -1) * module.scale
    if module.relative_position_bias_table is not None:
        scores = scores + _relative_bias(module, x.shape[1])
    if kwargs.get("shared_rel_pos_bias") is not None:
        scores = scores + kwargs["shared_rel_pos_bias"]
    return _softmax(scores)


def _eva(module: EvaAttention, inputs: Inputs) -> Tensor:
    (x,), kwargs = inputs
    assert kwargs.get("attn_mask") is None and not kwargs.get("is_causal")
    q, k = _split_qkv(F.linear(x, module.qkv.weight, _qkv_bias(module)), module.num_heads)
    q, k = module.q_norm(q), module.k_norm(k)
    rope, prefix = kwargs.get("rope"), module.num_prefix_tokens
    if rope is not None:
        q, k = (
            torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope)], dim=2)
            for t in (q, k)
        )
    return _softmax(q @ k.transpose(-2, -1) * module.scale)


def _swin(module: WindowAttention, inputs: Inputs) -> Tensor:
    (x, *rest), kwargs = inputs
    mask = kwargs.get("mask", rest[0] if rest else None)
    tokens = x.shape[1]
    q, k = _split_qkv(F.linear(x, module.qkv.weight, module.qkv.bias), module.num_heads)
    scores = q @ k.transpose(-2, -1) * module.scale + _relative_bias(module, tokens)
    if mask is not None:  # (windows, N, N), the batch being (images * windows)
        windows = mask.shape[0]
        scores = scores.reshape(-1, windows, module.num_heads, tokens, tokens)
        scores = (scores + mask[None, :, None]).reshape(-1, module.num_heads, tokens, tokens)
    return _softmax(scores)


def _class_attn(module: ClassAttn, inputs: Inputs) -> Tensor:
    (x,), _ = inputs
    q = _heads(module.q(x[:, :1]), module.num_heads)
    k = _heads(module.k(x), module.num_heads)
    return _softmax(q @ k.transpose(-2, -1) * module.scale)


def _talking_heads(module: TalkingHeadAttn, inputs: Inputs) -> Tensor:
    """The softmax between the two head mixings: the only normalised map the module makes."""
    (x,), _ = inputs
    q, k = _split_qkv(module.qkv(x), module.num_heads)
    scores = q @ k.transpose(-2, -1) * module.scale
    scores = module.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return _softmax(scores)


def _xca(module: XCA, inputs: Inputs) -> Tensor:
    """Cross-covariance attention: (batch, heads, channels, channels), over channels."""
    (x,), _ = inputs
    q, k = (t.transpose(-2, -1) for t in _split_qkv(module.qkv(x), module.num_heads))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return _softmax(q @ k.transpose(-2, -1) * module.temperature)


# Subclasses first: the references are looked up by isinstance, in order.
REFERENCES: tuple[tuple[type[nn.Module], Callable[[Any, Inputs], Tensor]], ...] = (
    (BeitAttention, _beit),
    (EvaAttention, _eva),
    (WindowAttention, _swin),
    (ClassAttn, _class_attn),
    (TalkingHeadAttn, _talking_heads),
    (XCA, _xca),
    (Attention, _vit),
)

# Each at test size: a few blocks, 16-64 tokens. Keyword arguments override the registered ones.
MODELS: dict[str, tuple[str, dict[str, Any], tuple[int, int]]] = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2),
        (32, 32),
    ),
    "vit_qk_norm": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2, qk_norm=True),
        (32, 32),
    ),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2),
        (32, 32),
    ),
    "beit": (
        "beit_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
        (32, 32),
    ),
    "beit_shared_bias": (
        "beit_base_patch16_224",
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=4,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
        ),
        (32, 32),
    ),
    "eva02_rope": (
        "eva02_tiny_patch14_224",
        dict(img_size=56, embed_dim=48, depth=2, ref_feat_shape=(4, 4)),
        (56, 56),
    ),
    "swin_shifted_windows": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4)),
        (32, 32),
    ),
    "cait_class_attention": (
        "cait_xxs24_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, depth_token_only=1),
        (32, 32),
    ),
    "xcit_cross_covariance": (
        "xcit_nano_12_p16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, cls_attn_layers=1),
        (32, 32),
    ),
}


def _reference(module: nn.Module) -> Callable[[Any, Inputs], Tensor] | None:
    for kind, reference in REFERENCES:
        if isinstance(module, kind):
            return reference
    return None


def _build(key: str, fused: bool) -> nn.Module:
    name, kwargs, _ = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    # Random init leaves position tables and some biases at zero or 1e-5-sized layer scales;
    # give every parameter a visible value so each bias and each branch moves the weights.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    flags = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags, f"{name} has no module with fused_attn"
    for module in flags:
        module.fused_attn = fused  # timm's own per-instance switch
    return model.eval()


def _inputs_seen(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The output, and the reference weights of every attention call, from a hooked forward."""
    seen: dict[str, Inputs] = {}
    handles = []
    for name, module in model.named_modules():
        if _reference(module) is not None:

            def pre_hook(m: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
                assert name not in seen, f"{name} called twice"
                seen[name] = (args, kwargs)

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    expected = {}
    for name, inputs in seen.items():
        reference = _reference(modules[name])
        assert reference is not None
        expected[name] = reference(modules[name], inputs)
    return out, expected


# A class-attention call (one query over every key, no cross-attention argument) is labelled
# 'self' with a warning that says so; the kind is asserted below.
@pytest.mark.filterwarnings(r"ignore:.*\(ClassAttn\). its first call has 1 queries:UserWarning")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("key", list(MODELS))
def test_timm_model_is_captured_exactly(
    key: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build(key, fused)
    height, width = MODELS[key][2]
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    kernel, kernel_calls = F.scaled_dot_product_attention, []

    def counting(*args: Any, **kwargs: Any) -> Tensor:
        kernel_calls.append(1)
        return kernel(*args, **kwargs)

    with torch.no_grad():
        with monkeypatch.context() as patch:  # a counter around the plain forward only
            patch.setattr(F, "scaled_dot_product_attention", counting)
            plain = model(x)
        flagged = sum(hasattr(m, "fused_attn") for m in model.modules())
        assert len(kernel_calls) == (flagged if fused else 0)  # the flag chose the kernel
        with attnscope.capture(model) as attn:
            out = model(x)
        hooked, expected = _inputs_seen(model, x)
    assert torch.equal(out, plain)
    assert torch.equal(hooked, plain)
    assert attn.names == list(expected)
    assert not attn.skipped
    for name, weights in expected.items():
        assert attn.kind(name) == "self"
        got = attn[name]
        assert got.shape == weights.shape, name
        assert_weights_match(got, weights)
