"""Hand references for issue #16 ("Beyond raw attention"), sharing no code with attnscope.

Everything here is written from the papers and from the modules' own parameters:

- ``eager_attention_grads``: ∂loss/∂A by autograd through Hugging Face's eager implementation,
  the tensors ``output_attentions=True`` returns being the very softmax outputs its ``A @ V``
  consumed (``torch.autograd.grad`` refuses them otherwise).
- ``geometry``: each head's explicit value and output matrices, so that
  ``f_h(x) = (x W_V^h + b_V^h) W_O^h`` (Kobayashi et al. 2020) is plain matrix algebra.
  BERT: ``attention.self.value`` and ``attention.output.dense``; GPT-2: the value third of
  ``attn.c_attn`` and ``attn.c_proj`` (``Conv1D``: weight is (in, out)); Llama: ``v_proj``
  with its key/value heads repeated for grouped queries, and ``o_proj``; PyTorch's
  ``nn.MultiheadAttention``: the value third of ``in_proj_*`` and ``out_proj``.
- ``head_hook``: an ordinary forward pre-hook on the output projection that rewrites each
  head's slice of its input (the per-head context vectors): a head mask ξ (Michel et al.
  2019), zero or mean ablation.
- ``eager_knockout``: a forward pre-hook on one eager attention module that sets chosen
  (query, key) entries of its additive attention mask to −∞ (Geva et al. 2023).
- ``hand_encoder``: ``nn.TransformerEncoder`` (post-norm, ReLU) recomputed from its
  parameters, with the attention weights, head contexts and per-layer edits exposed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# The attention module (as attnscope names it), its value projection and output projection,
# relative to one layer, per family.
LAYOUT = {
    "bert": (
        "encoder.layer.{i}.attention.self",
        "encoder.layer.{i}.attention.self.value",
        "encoder.layer.{i}.attention.output.dense",
    ),
    "gpt2": ("h.{i}.attn", "h.{i}.attn.c_attn", "h.{i}.attn.c_proj"),
    "llama": ("layers.{i}.self_attn", "layers.{i}.self_attn.v_proj", "layers.{i}.self_attn.o_proj"),
}


def attention_names(family: str, layers: int = 2) -> list[str]:
    return [LAYOUT[family][0].format(i=i) for i in range(layers)]


def value_module(family: str, layer: int) -> str:
    return LAYOUT[family][1].format(i=layer)


def out_proj_module(family: str, layer: int) -> str:
    return LAYOUT[family][2].format(i=layer)


@dataclass
class Geometry:
    """Explicit per-head matrices of one attention module, one entry per query head."""

    w_v: Tensor  # (heads, in, head_dim)
    b_v: Tensor  # (heads, head_dim)
    w_o: Tensor  # (heads, head_dim, out)
    b_o: Tensor  # (out,)

    @property
    def heads(self) -> int:
        return self.w_v.size(0)

    @property
    def head_dim(self) -> int:
        return self.w_v.size(2)

    def values(self, x: Tensor) -> Tensor:
        """(batch, key, in) -> (batch, heads, key, head_dim): x W_V^h + b_V^h."""
        return torch.einsum("bke,hed->bhkd", x, self.w_v) + self.b_v[None, :, None, :]

    def transformed(self, x: Tensor) -> Tensor:
        """(batch, key, in) -> (batch, heads, key, out): f_h(x_j) = (x_j W_V^h + b_V^h) W_O^h."""
        return torch.einsum("bhkd,hdo->bhko", self.values(x), self.w_o)

    def output(self, weights: Tensor, x: Tensor) -> Tensor:
        """The attention block's output Σ_h Σ_j A_ij^h f_h(x_j) + b_O: (batch, query, out)."""
        return torch.einsum("bhqk,bhko->bqo", weights, self.transformed(x)) + self.b_o

    def norms(self, weights: Tensor, x: Tensor) -> Tensor:
        """α_ij · ‖f_h(x_j)‖₂, (batch, heads, query, key)."""
        return weights * self.transformed(x).norm(dim=-1)[:, :, None, :]


def geometry(model: nn.Module, family: str, layer: int) -> Geometry:
    """Read one layer's per-head matrices straight from its parameters."""
    modules: dict[str, Any] = dict(model.named_modules())
    value = modules[value_module(family, layer)]
    out = modules[out_proj_module(family, layer)]
    config: Any = model.config
    heads: int = config.num_attention_heads
    hidden: int = config.hidden_size
    head_dim: int = getattr(config, "head_dim", None) or hidden // heads
    if family == "bert":
        w = value.weight.T  # Linear: (out, in) -> (in, heads*d)
        b = value.bias
        w_o = out.weight.T  # (heads*d, out)
        b_o = out.bias
        group = 1
    elif family == "gpt2":
        w = value.weight[:, 2 * hidden : 3 * hidden]  # Conv1D: (in, 3*hidden), q | k | v
        b = value.bias[2 * hidden : 3 * hidden]
        w_o = out.weight  # Conv1D: (in, out)
        b_o = out.bias
        group = 1
    elif family == "llama":
        kv_heads = config.num_key_value_heads
        w = value.weight.T  # (in, kv_heads*d)
        b = value.bias if value.bias is not None else torch.zeros(kv_heads * head_dim)
        w_o = out.weight.T
        b_o = out.bias if out.bias is not None else torch.zeros(out.weight.size(0))
        group = heads // kv_heads
    else:
        raise ValueError(family)
    w = w.detach()
    b = b.detach()
    kv_of = [h // group for h in range(heads)]
    w_v = torch.stack([w[:, k * head_dim : (k + 1) * head_dim] for k in kv_of])
    b_v = torch.stack([b[k * head_dim : (k + 1) * head_dim] for k in kv_of])
    w_o_heads = torch.stack(
        [w_o[h * head_dim : (h + 1) * head_dim, :].detach() for h in range(heads)]
    )
    return Geometry(w_v, b_v, w_o_heads, b_o.detach())


def mha_geometry(mha: nn.MultiheadAttention) -> Geometry:
    """The same matrices for ``nn.MultiheadAttention`` (packed in_proj, value third)."""
    embed, heads = mha.embed_dim, mha.num_heads
    d = embed // heads
    assert mha.in_proj_weight is not None and mha.in_proj_bias is not None
    w = mha.in_proj_weight[2 * embed :].detach().T  # (in, heads*d)
    b = mha.in_proj_bias[2 * embed :].detach()
    w_o = mha.out_proj.weight.detach().T
    return Geometry(
        torch.stack([w[:, h * d : (h + 1) * d] for h in range(heads)]),
        torch.stack([b[h * d : (h + 1) * d] for h in range(heads)]),
        torch.stack([w_o[h * d : (h + 1) * d] for h in range(heads)]),
        mha.out_proj.bias.detach(),
    )


@contextlib.contextmanager
def recording(
    model: nn.Module, inputs_of: Sequence[str] = (), outputs_of: Sequence[str] = ()
) -> Iterator[dict[str, Tensor]]:
    """Keep the first positional input of some modules and the output of others, by name."""
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    handles = []
    for name in inputs_of:

        def pre(module: nn.Module, args: tuple[Any, ...], key: str = name) -> None:
            seen["in:" + key] = args[0]

        handles.append(modules[name].register_forward_pre_hook(pre))
    for name in outputs_of:

        def post(module: nn.Module, args: Any, output: Any, key: str = name) -> None:
            seen["out:" + key] = output

        handles.append(modules[name].register_forward_hook(post))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


HeadEdit = Callable[[Tensor], Tensor]  # (batch, seq, heads, head_dim) -> same


@contextlib.contextmanager
def head_hook(model: nn.Module, edits: Mapping[str, HeadEdit], heads: int) -> Iterator[None]:
    """Rewrite the per-head contexts entering some output projections (module name -> edit)."""
    modules = dict(model.named_modules())
    handles = []
    for name, edit in edits.items():

        def pre(module: nn.Module, args: tuple[Any, ...], edit: HeadEdit = edit) -> tuple[Any, ...]:
            context = args[0]
            split = context.reshape(*context.shape[:-1], heads, context.size(-1) // heads)
            return (edit(split).reshape(context.shape), *args[1:])

        handles.append(modules[name].register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def scale_heads(xi: Tensor) -> HeadEdit:
    """ξ_h times head h's context (a head mask)."""
    return lambda context: context * xi[:, None].to(context.dtype)


def zero_heads(heads: Sequence[int]) -> HeadEdit:
    def edit(context: Tensor) -> Tensor:
        keep = torch.ones(context.size(-2), dtype=context.dtype)
        keep[list(heads)] = 0
        return context * keep[:, None]

    return edit


def mean_heads(heads: Sequence[int], valid: Tensor) -> HeadEdit:
    """Replace those heads' contexts by their mean over the valid (batch, position) pairs."""

    def edit(context: Tensor) -> Tensor:
        out = context.clone()
        mean = context[valid.bool()].mean(dim=0)  # (heads, head_dim)
        for h in heads:
            out[:, :, h, :] = mean[h]
        return out

    return edit


@contextlib.contextmanager
def eager_knockout(
    model: nn.Module, edges: Mapping[str, Sequence[tuple[int, int]]]
) -> Iterator[None]:
    """−∞ at (query, key) of those eager attention modules' additive masks, every item and head."""
    modules = dict(model.named_modules())
    handles = []
    for name, pairs in edges.items():

        def pre(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            pairs: Sequence[tuple[int, int]] = pairs,
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            mask = kwargs["attention_mask"]
            assert mask is not None and mask.dim() == 4 and mask.is_floating_point()
            mask = mask.clone()
            for query, key in pairs:
                mask[:, :, query, key] = float("-inf")
            return args, {**kwargs, "attention_mask": mask}

        handles.append(modules[name].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def eager_attention_grads(
    eager: nn.Module, inputs: Mapping[str, Any], loss: Callable[[Any], Tensor]
) -> tuple[Any, list[Tensor], list[Tensor]]:
    """(outputs, weights, ∂loss/∂weights) of the eager model, by autograd."""
    out = eager(**inputs, output_attentions=True)
    weights = list(out.attentions)
    grads = torch.autograd.grad(loss(out), weights)
    return out, [w.detach() for w in weights], [g.detach() for g in grads]


def zero_padded_rows(weights: Tensor, attention_mask: Tensor) -> Tensor:
    """attnscope's convention: padded query rows carry no information and are zeros."""
    return weights * attention_mask[:, None, :, None].to(weights.dtype)


def projection_loss(
    shape: Sequence[int], valid: Tensor | None = None, seed: int = 3
) -> Callable[[Tensor], Tensor]:
    """A scalar loss Σ tanh(y) ⊙ W of a (batch, seq, hidden) output, W fixed and random.

    With ``valid`` ((batch, seq), 1 at real tokens) W is zero at padded positions: a left-padded
    causal model's padded queries see no key at all, and eager (uniform rows) and sdpa differ
    there by design, so a loss reading them would compare two conventions, not two kernels.
    """
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if valid is not None:
        w = w * valid[..., None].to(w.dtype)
    return lambda y: (y.tanh() * w.to(y.dtype)).sum()


# -- nn.TransformerEncoder by hand ------------------------------------------------------------


@dataclass
class HandEncoder:
    output: Tensor  # (batch, seq, embed)
    weights: list[Tensor]  # per layer (batch, heads, q, k), on the autograd graph
    contexts: list[Tensor]  # per layer (batch, seq, heads, head_dim) after edits
    inputs: list[Tensor]  # per layer, the layer's input (= the value projection's input)


def hand_encoder(
    encoder: nn.TransformerEncoder,
    src: Tensor,
    padding: Tensor | None = None,
    *,
    edits: Mapping[int, HeadEdit] | None = None,
    knockout: Mapping[int, Sequence[tuple[int, int]]] | None = None,
) -> HandEncoder:
    """Post-norm ReLU encoder layers, batch_first, recomputed from their parameters.

    ``padding`` is (batch, seq) bool, True at padded keys; ``edits`` rewrite a layer's head
    contexts before its output projection; ``knockout`` sets scores to −∞ in a layer.
    """
    assert encoder.norm is None
    x = src
    weights, contexts, inputs = [], [], []
    for index, layer in enumerate(encoder.layers):
        assert layer.self_attn.batch_first and not layer.norm_first
        assert layer.activation_relu_or_gelu == 1
        mha = layer.self_attn
        batch, seq, embed = x.shape
        heads = mha.num_heads
        d = embed // heads
        inputs.append(x)
        qkv = x @ mha.in_proj_weight.T + mha.in_proj_bias
        q, k, v = (t.reshape(batch, seq, heads, d).transpose(1, 2) for t in qkv.split(embed, -1))
        scores = (q / math.sqrt(d)) @ k.transpose(-1, -2)
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        for query, key in (knockout or {}).get(index, ()):
            hit = torch.zeros_like(scores, dtype=torch.bool)
            hit[:, :, query, key] = True
            scores = scores.masked_fill(hit, float("-inf"))
        a = scores.softmax(dim=-1)
        weights.append(a)
        context = (a @ v).transpose(1, 2)  # (batch, seq, heads, d)
        if edits and index in edits:
            context = edits[index](context)
        contexts.append(context)
        attended = context.reshape(batch, seq, embed) @ mha.out_proj.weight.T + mha.out_proj.bias
        x = nn.functional.layer_norm(
            x + attended, (embed,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps
        )
        hidden = nn.functional.relu(x @ layer.linear1.weight.T + layer.linear1.bias)
        x = nn.functional.layer_norm(
            x + hidden @ layer.linear2.weight.T + layer.linear2.bias,
            (embed,),
            layer.norm2.weight,
            layer.norm2.bias,
            layer.norm2.eps,
        )
    return HandEncoder(x, weights, contexts, inputs)
