"""Issue #16, beyond raw attention: gradients, norms, gradient rollout, head importance,
ablation and knockout, each against a hand reference that shares no code with attnscope
(``beyond_reference``): autograd through Hugging Face's eager weights, explicit per-head
matrices read from the parameters, head-mask and mask-editing hooks, and
``nn.TransformerEncoder`` recomputed by hand. The ``test_reference_*`` tests check those
references against the models themselves first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import attnscope
import beyond_reference as br
import models
from attnscope import AttnScopeError
from hf_models import Family, _ids, _right_padding, build
from reference import slow_path_weights

pytest.importorskip("transformers")

HF = ("bert", "gpt2", "llama")
BATCH, SEQ, HIDDEN = 2, 9, 32


def close(got: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def family(name: str, dtype: torch.dtype = torch.float32) -> Family:
    """A tiny model pair (sdpa, eager; same weights), batch 2, the second item padded on the
    right: every padded query still sees real keys, so each entry of A and ∂L/∂A has one
    meaning in both implementations (see ``projection_loss`` for left padding)."""
    built = build(name)
    built.inputs["attention_mask"] = _right_padding(BATCH, SEQ, [9, 6])
    built.model.to(dtype)
    built.eager.to(dtype)
    return built


def hidden(out: Any) -> Tensor:
    return out.last_hidden_state


def loss_of(out: Any) -> Tensor:
    return br.projection_loss((BATCH, SEQ, HIDDEN))(hidden(out))


def run(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        return hidden(model(**inputs))


def hand_rollout(layers: list[Tensor]) -> Tensor:
    """Abnar & Zuidema: mean over heads, + I, rows renormalised, later layers on the left."""
    joint = None
    padded = layers[0].sum(dim=(1, -1)) == 0
    for weights in layers:
        fused = weights.mean(dim=1) + torch.eye(weights.size(-1), dtype=weights.dtype)
        matrix = fused / fused.sum(dim=-1, keepdim=True)
        joint = matrix if joint is None else matrix @ joint
    assert joint is not None
    return joint.masked_fill(padded[..., None], 0.0)


# -- the references, checked against the models ------------------------------------------------


@pytest.mark.parametrize("name", HF)
def test_reference_sdpa_and_eager_share_weights(name: str) -> None:
    f = family(name, torch.float64)
    close(run(f.model, f.inputs), run(f.eager, f.inputs))


@pytest.mark.parametrize("name", HF)
def test_reference_eager_grad_is_context_grad_times_values(name: str) -> None:
    """∂L/∂A from eager autograd equals ∂L/∂O_h · V_hᵀ built from explicit value matrices."""
    f = family(name, torch.float64)
    values = [br.value_module(name, i) for i in range(2)]
    outs = [br.out_proj_module(name, i) for i in range(2)]
    with br.recording(f.eager, inputs_of=values + outs) as seen:
        out = f.eager(**f.inputs, output_attentions=True)
        contexts = [seen["in:" + m] for m in outs]
        grads = torch.autograd.grad(loss_of(out), list(out.attentions) + contexts)
    for i in range(2):
        g = br.geometry(f.eager, name, i)
        d_context = grads[2 + i].reshape(BATCH, SEQ, g.heads, g.head_dim)
        by_hand = torch.einsum("bqhd,bhkd->bhqk", d_context, g.values(seen["in:" + values[i]]))
        close(grads[i], by_hand)
        assert grads[i].abs().max() > 1e-3


@pytest.mark.parametrize("name", HF)
def test_reference_explicit_matrices_rebuild_the_attention_output(name: str) -> None:
    """Σ_h Σ_j A_ij f_h(x_j) + b_O is the output projection's output: the value path, the head
    slicing (GQA's repeated value heads, GPT-2's Conv1D layout) and W_O are right."""
    f = family(name, torch.float64)
    values = [br.value_module(name, i) for i in range(2)]
    outs = [br.out_proj_module(name, i) for i in range(2)]
    with torch.no_grad(), br.recording(f.eager, inputs_of=values, outputs_of=outs) as seen:
        out = f.eager(**f.inputs, output_attentions=True)
    for i in range(2):
        g = br.geometry(f.eager, name, i)
        rebuilt = g.output(out.attentions[i], seen["in:" + values[i]])
        close(rebuilt, seen["out:" + outs[i]])


@pytest.mark.parametrize("name", HF)
def test_reference_head_hook(name: str) -> None:
    """ξ = 1 changes no bit; zeroing a head by hand changes the output."""
    f = family(name)
    plain = run(f.model, f.inputs)
    ones = {br.out_proj_module(name, i): br.scale_heads(torch.ones(4)) for i in range(2)}
    with br.head_hook(f.model, ones, 4):
        assert torch.equal(run(f.model, f.inputs), plain)
    with br.head_hook(f.model, {br.out_proj_module(name, 0): br.zero_heads([1])}, 4):
        assert (run(f.model, f.inputs) - plain).abs().max() > 1e-3
    assert torch.equal(run(f.model, f.inputs), plain)


@pytest.mark.parametrize("name", HF)
def test_reference_eager_knockout(name: str) -> None:
    """No edge: the same bits; with edges: eager's own weights are 0 there, rows sum to 1."""
    f = family(name)
    layer = br.attention_names(name)[0]
    plain = f.eager(**f.inputs, output_attentions=True)
    with torch.no_grad(), br.eager_knockout(f.eager, {layer: []}):
        assert torch.equal(hidden(f.eager(**f.inputs)), hidden(plain))
    with torch.no_grad(), br.eager_knockout(f.eager, {layer: [(5, 2), (4, 4)]}):
        knocked = f.eager(**f.inputs, output_attentions=True)
    weights = knocked.attentions[0]
    assert torch.all(weights[:, :, 5, 2] == 0) and torch.all(weights[:, :, 4, 4] == 0)
    assert plain.attentions[0][:, :, 5, 2].min() > 0
    close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert (hidden(knocked) - hidden(plain)).abs().max() > 1e-4


def test_reference_hand_encoder_matches_torch() -> None:
    model = models.encoder().eval()
    src, padding = models.sequence(2, 5), models.padding([5, 3], 5)
    slow = model(src, src_key_padding_mask=padding)  # grad on: PyTorch's Python path
    with torch.no_grad():
        fast = model(src, src_key_padding_mask=padding)  # the fused kernel, nested tensors
    hand = br.hand_encoder(model, src, padding)
    close(hand.output, slow)
    close(hand.output[~padding], fast[~padding])
    weights = slow_path_weights(model, lambda m: m(src, src_key_padding_mask=padding))
    for i, name in enumerate(["layers.0.self_attn", "layers.1.self_attn"]):
        close(hand.weights[i], weights[name][0])
        geometry = br.mha_geometry(model.layers[i].self_attn)
        attended = hand.contexts[i].reshape(2, 5, 16) @ model.layers[i].self_attn.out_proj.weight.T
        close(
            geometry.output(hand.weights[i], hand.inputs[i]),
            attended + model.layers[i].self_attn.out_proj.bias,
        )


def test_reference_hand_rollout_matches_attnscope_rollout() -> None:
    f = family("bert")
    eager = f.eager(**f.inputs, output_attentions=True)
    mask = f.inputs["attention_mask"]
    weights = {
        n: br.zero_padded_rows(w.detach(), mask)
        for n, w in zip(br.attention_names("bert"), eager.attentions, strict=True)
    }
    maps = attnscope.AttentionMaps.from_tensors(weights, kinds="self")
    close(attnscope.rollout(maps), hand_rollout(list(weights.values())))


# -- 1. grads=True -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bert", torch.float32),
        ("bert", torch.float64),
        ("gpt2", torch.float64),
        ("llama", torch.float64),
    ],
)
def test_grads_equal_eager_autograd(name: str, dtype: torch.dtype) -> None:
    f = family(name, dtype)
    expected = f.model(**f.inputs)
    with attnscope.capture(f.model, grads=True) as attn:
        out = f.model(**f.inputs)
        loss_of(out).backward()
    assert torch.equal(hidden(out), hidden(expected))
    _, _, grads = br.eager_attention_grads(f.eager, f.inputs, loss_of)
    assert attn.names == br.attention_names(name)
    for layer, reference in zip(attn.names, grads, strict=True):
        got = attn.grad(layer)
        assert got.shape == attn[layer].shape == reference.shape
        # every entry: padded query rows, masked (future and padded) keys included
        close(got.to(reference.dtype), reference)
        assert reference[1, :, :, 6:].abs().min() > 0  # padded keys carry a gradient too


def test_grads_leave_parameter_gradients_untouched() -> None:
    f = family("bert")
    twin = copy.deepcopy(f.model)
    loss_of(twin(**f.inputs)).backward()
    with attnscope.capture(f.model, grads=True):
        loss_of(f.model(**f.inputs)).backward()
    compared = 0
    for (name, p), q in zip(f.model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name  # the pooler is not in the loss
        if p.grad is not None and q.grad is not None:
            assert torch.equal(p.grad, q.grad), name
            compared += 1
    assert compared > 20


def test_grads_leave_nothing_on_the_graph() -> None:
    f = family("bert")
    with attnscope.capture(f.model, grads=True) as attn:
        loss = loss_of(f.model(**f.inputs))
        loss.backward(retain_graph=True)
    kept = {n: attn.grad(n).clone() for n in attn.names}
    first = {n: p.grad.clone() for n, p in f.model.named_parameters() if p.grad is not None}
    loss.backward()  # the graph built inside the block, walked again after it
    for n in attn.names:
        assert torch.equal(attn.grad(n), kept[n])
    for n, p in f.model.named_parameters():
        if n in first:
            close(p.grad, 2 * first[n])
    # and a later forward and backward without capture is the model's own
    f.model.zero_grad()
    twin = copy.deepcopy(f.model)
    loss_of(f.model(**f.inputs)).backward()
    loss_of(twin(**f.inputs)).backward()
    for p, q in zip(f.model.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
    for n in attn.names:
        assert torch.equal(attn.grad(n), kept[n])


def test_grads_torch_encoder_equal_hand_autograd() -> None:
    model = models.encoder().eval().double()
    src, padding = models.sequence(2, 5).double(), models.padding([5, 3], 5)
    loss = br.projection_loss((2, 5, models.D_MODEL))
    expected = model(src, src_key_padding_mask=padding)  # grad on: the same path as below
    hand = br.hand_encoder(model, src, padding)
    reference = torch.autograd.grad(loss(hand.output), hand.weights)
    with attnscope.capture(model, grads=True) as attn:
        out = model(src, src_key_padding_mask=padding)
        loss(out).backward()
    assert torch.equal(out, expected)
    close(hand.output, expected)
    assert attn.names == ["layers.0.self_attn", "layers.1.self_attn"]
    for name, grad in zip(attn.names, reference, strict=True):
        assert attn.grad(name).shape == attn[name].shape
        close(attn.grad(name).double(), grad)


# -- 2. norms=True -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", HF)
def test_norms_equal_explicit_matrices(name: str) -> None:
    f = family(name, torch.float64)
    values = [br.value_module(name, i) for i in range(2)]
    with torch.no_grad(), br.recording(f.eager, inputs_of=values) as seen:
        eager = f.eager(**f.inputs, output_attentions=True)
    with torch.no_grad(), attnscope.capture(f.model, norms=True) as attn:
        f.model(**f.inputs)
    mask = f.inputs["attention_mask"]
    for i, layer in enumerate(attn.names):
        g = br.geometry(f.eager, name, i)
        weights = br.zero_padded_rows(eager.attentions[i], mask)
        expected = g.norms(weights, seen["in:" + values[i]])
        got = attn.norms(layer)
        assert got.shape == attn[layer].shape
        close(got.double(), expected)
        # not the weights again: ‖f_h(x_j)‖ differs from key to key
        lengths = g.transformed(seen["in:" + values[i]]).norm(dim=-1)
        assert lengths.std() > 0.1 * lengths.mean()


def test_norms_torch_encoder_equal_explicit_matrices() -> None:
    model = models.encoder().eval().double()
    src, padding = models.sequence(2, 5).double(), models.padding([5, 3], 5)
    with torch.no_grad():
        hand = br.hand_encoder(model, src, padding)
        with attnscope.capture(model, norms=True) as attn:
            model(src, src_key_padding_mask=padding)
    valid = (~padding).long()
    for i, name in enumerate(attn.names):
        g = br.mha_geometry(model.layers[i].self_attn)
        expected = g.norms(br.zero_padded_rows(hand.weights[i], valid), hand.inputs[i])
        close(attn.norms(name).double(), expected)


class _SdpaWithProjection(nn.Module):
    """Hand-written attention through sdpa with values of fewer dims than the queries."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.out_proj = nn.Linear(heads * 8, 16, dtype=torch.float64)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if q.dim() == 3:
            return self.out_proj(out)
        return self.out_proj(out.transpose(1, 2).reshape(q.size(0), q.size(2), -1))


@pytest.mark.filterwarnings("ignore:.*labelled 'self'")
@pytest.mark.parametrize(
    ("query_shape", "value_shape"),
    [((2, 4, 5, 8), (4, 6, 8)), ((2, 4, 5, 8), (1, 6, 8)), ((2, 5, 8), (2, 6, 8))],
)
def test_norms_of_values_the_kernel_broadcasts(
    query_shape: tuple[int, ...], value_shape: tuple[int, ...]
) -> None:
    """A 3-D value beside 4-D queries is (heads, key, dim), shared by the batch, as sdpa
    broadcasts it; beside 3-D queries it is (batch, key, dim). By hand: softmax(q kᵀ/√d)
    times ‖v_h W_O^h‖."""
    g = torch.Generator().manual_seed(0)
    heads = query_shape[1] if len(query_shape) == 4 else 1
    model = _SdpaWithProjection(heads)
    q = torch.randn(query_shape, generator=g, dtype=torch.float64)
    k = torch.randn((*query_shape[:-2], 6, 8), generator=g, dtype=torch.float64)
    v = torch.randn(value_shape, generator=g, dtype=torch.float64)
    with torch.no_grad(), attnscope.capture(model, norms=True) as attn:
        model(q, k, v)
    q4, k4 = (q, k) if q.dim() == 4 else (q[:, None], k[:, None])
    v4 = v[None] if q.dim() == 4 else v[:, None]
    weights = torch.softmax(q4 @ k4.transpose(-1, -2) / 8**0.5, dim=-1)
    per_head = model.out_proj.weight.detach().view(16, heads, 8)
    lengths = torch.stack(
        [(v4[:, h % v4.size(1)] @ per_head[:, h].t()).norm(dim=-1) for h in range(heads)], dim=1
    )
    torch.testing.assert_close(attn.norms(attn.names[0]), weights * lengths[:, :, None, :])


# -- 3. grad_rollout and rollout(weights="norms") ----------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [("bert", "self"), ("gpt2", "causal")])
def test_grad_rollout_equals_hand_loop(name: str, kind: str) -> None:
    f = family(name, torch.float64)
    _, weights, grads = br.eager_attention_grads(f.eager, f.inputs, loss_of)
    mask = f.inputs["attention_mask"]
    joint = torch.eye(SEQ, dtype=torch.float64).expand(BATCH, SEQ, SEQ)
    for w, g in zip(weights, grads, strict=True):
        cam = (g * br.zero_padded_rows(w, mask)).clamp(min=0).mean(dim=1)
        joint = joint + cam @ joint
    with attnscope.capture(f.model, grads=True) as attn:
        loss_of(f.model(**f.inputs)).backward()
    got = attnscope.grad_rollout(attn, kind=kind)
    assert got.shape == (BATCH, SEQ, SEQ)
    close(got.double(), joint)
    assert (joint - torch.eye(SEQ)).abs().max() > 1e-3


def test_rollout_of_norm_weighted_maps() -> None:
    f = family("bert", torch.float64)
    values = [br.value_module("bert", i) for i in range(2)]
    with torch.no_grad(), br.recording(f.eager, inputs_of=values) as seen:
        eager = f.eager(**f.inputs, output_attentions=True)
    mask = f.inputs["attention_mask"]
    layers = []
    for i in range(2):
        g = br.geometry(f.eager, "bert", i)
        norms = g.norms(br.zero_padded_rows(eager.attentions[i], mask), seen["in:" + values[i]])
        sums = norms.sum(dim=-1, keepdim=True)
        layers.append(torch.where(sums > 0, norms / sums.clamp_min(1e-300), norms))
    with torch.no_grad(), attnscope.capture(f.model, norms=True) as attn:
        f.model(**f.inputs)
    got = attnscope.rollout(attn, weights="norms")
    close(got.double(), hand_rollout(layers))
    assert (got - attnscope.rollout(attn)).abs().max() > 1e-4  # not the plain rollout


# -- 4. head_importance ------------------------------------------------------------------------


def hf_batches() -> list[dict[str, Tensor]]:
    return [
        {"input_ids": _ids(99, 2, SEQ, seed=0), "attention_mask": _right_padding(2, SEQ, [9, 6])},
        {"input_ids": _ids(99, 2, SEQ, seed=5), "attention_mask": _right_padding(2, SEQ, [7, 9])},
    ]


def masked_loss(outputs: Any, batch: dict[str, Tensor]) -> Tensor:
    return br.projection_loss((BATCH, SEQ, HIDDEN), batch["attention_mask"])(hidden(outputs))


def importances(table: Any) -> dict[tuple[str, int], float]:
    rows = list(table)
    found = {(str(r["module"]), int(r["head"])): float(r["importance"]) for r in rows}
    assert len(found) == len(rows)
    return found


@pytest.mark.parametrize("name", HF)
def test_head_importance_equals_hand_head_mask(name: str) -> None:
    f = family(name)
    batches = hf_batches()
    xi = {br.out_proj_module(name, i): torch.ones(4, requires_grad=True) for i in range(2)}
    expected = torch.zeros(2, 4)
    with br.head_hook(f.model, {m: br.scale_heads(x) for m, x in xi.items()}, 4):
        for batch in batches:
            grads = torch.autograd.grad(masked_loss(f.model(**batch), batch), list(xi.values()))
            expected += torch.stack(grads).abs()
    before = run(f.model, f.inputs)
    table = attnscope.head_importance(f.model, batches, masked_loss)
    got = importances(table)
    assert set(got) == {(n, h) for n in br.attention_names(name) for h in range(4)}
    for i, module in enumerate(br.attention_names(name)):
        close(torch.tensor([got[(module, h)] for h in range(4)]), expected[i])
    assert expected.min() > 0
    assert torch.equal(run(f.model, f.inputs), before)


@pytest.mark.parametrize("form", ["tuple", "tensor"])
def test_head_importance_torch_encoder_batches(form: str) -> None:
    """A tuple batch is called as ``model(*batch)``, anything else as ``model(batch)``."""
    model = models.encoder().eval()
    sources = [models.sequence(2, 5, seed=s) for s in (1, 2)]
    loss = br.projection_loss((2, 5, models.D_MODEL))
    expected = torch.zeros(2, 4)
    for src in sources:
        xi = [torch.ones(4, requires_grad=True) for _ in range(2)]
        hand = br.hand_encoder(model, src, edits={i: br.scale_heads(x) for i, x in enumerate(xi)})
        expected += torch.stack(torch.autograd.grad(loss(hand.output), xi)).abs()
    batches: list[Any] = [(s,) for s in sources] if form == "tuple" else list(sources)
    got = importances(attnscope.head_importance(model, batches, lambda out, batch: loss(out)))
    for i in range(2):
        close(torch.tensor([got[(f"layers.{i}.self_attn", h)] for h in range(4)]), expected[i])


# -- 5. ablate and knockout --------------------------------------------------------------------

ABLATED = {0: [1, 3], 1: [0]}


@pytest.mark.parametrize("name", HF)
def test_ablate_zero_equals_hand_hook(name: str) -> None:
    f = family(name)
    before = run(f.model, f.inputs)
    edits = {br.out_proj_module(name, i): br.zero_heads(h) for i, h in ABLATED.items()}
    with br.head_hook(f.model, edits, 4):
        expected = run(f.model, f.inputs)
    assert (expected - before).abs().max() > 1e-3
    heads = {br.attention_names(name)[i]: h for i, h in ABLATED.items()}
    with attnscope.ablate(f.model, heads):  # how="zero" is the default
        close(run(f.model, f.inputs), expected)
    assert torch.equal(run(f.model, f.inputs), before)
    with attnscope.ablate(f.model, heads, how="zero"):
        close(run(f.model, f.inputs), expected)


@pytest.mark.parametrize("name", HF)
def test_ablate_mean_equals_hand_hook(name: str) -> None:
    """Those heads' contexts become their mean over the batch's real tokens (compared there:
    what padded positions hold is no user's business)."""
    f = family(name)
    valid = f.inputs["attention_mask"].bool()
    before = run(f.model, f.inputs)
    edits = {br.out_proj_module(name, i): br.mean_heads(h, valid) for i, h in ABLATED.items()}
    with br.head_hook(f.model, edits, 4):
        expected = run(f.model, f.inputs)
    with br.head_hook(f.model, {m: br.zero_heads(ABLATED[i]) for i, m in enumerate(edits)}, 4):
        zeroed = run(f.model, f.inputs)
    assert (expected - zeroed)[valid].abs().max() > 1e-3  # the mean is not zero
    heads = {br.attention_names(name)[i]: h for i, h in ABLATED.items()}
    with attnscope.ablate(f.model, heads, how="mean"):
        close(run(f.model, f.inputs)[valid], expected[valid])
    assert torch.equal(run(f.model, f.inputs), before)


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_ablate_torch_encoder_equals_hand(how: str) -> None:
    model = models.encoder().eval()
    src, padding = models.sequence(2, 5), models.padding([5, 3], 5)
    valid = ~padding
    with torch.no_grad():
        before = model(src, src_key_padding_mask=padding)
        edit: Callable[[list[int]], br.HeadEdit] = (
            br.zero_heads if how == "zero" else lambda h: br.mean_heads(h, valid)
        )
        edits = {i: edit(h) for i, h in ABLATED.items()}
        expected = br.hand_encoder(model, src, padding, edits=edits).output
        heads = {f"layers.{i}.self_attn": h for i, h in ABLATED.items()}
        with attnscope.ablate(model, heads, how=how):
            got = model(src, src_key_padding_mask=padding)
        after = model(src, src_key_padding_mask=padding)
    assert (expected - before)[valid].abs().max() > 1e-3
    close(got[valid], expected[valid])
    assert torch.equal(after, before)


# (query, key): key <= query, and keys that are real tokens in both items
EDGES = {0: [(5, 2), (4, 4), (8, 0)], 1: [(3, 1)]}


@pytest.mark.parametrize(
    ("name", "dtype"), [(n, torch.float64) for n in HF] + [("bert", torch.float32)]
)
def test_knockout_equals_eager_reference(name: str, dtype: torch.dtype) -> None:
    f = family(name, dtype)
    names = br.attention_names(name)
    edges = {names[i]: e for i, e in EDGES.items()}
    before = run(f.model, f.inputs)
    with torch.no_grad(), br.eager_knockout(f.eager, edges):
        reference = f.eager(**f.inputs, output_attentions=True)
    assert (hidden(reference) - before).abs().max() > 1e-4
    mask = f.inputs["attention_mask"]
    with torch.no_grad(), attnscope.knockout(f.model, edges), attnscope.capture(f.model) as attn:
        out = f.model(**f.inputs)
    close(hidden(out), hidden(reference))
    for i, layer in enumerate(names):
        weights = attn[layer]
        for query, key in EDGES[i]:
            assert torch.all(weights[:, :, query, key] == 0)
        sums = weights.sum(dim=-1)[mask.bool()[:, None, :].expand(-1, 4, -1)]
        close(sums, torch.ones_like(sums))
        close(
            weights.to(reference.attentions[i].dtype),
            br.zero_padded_rows(reference.attentions[i], mask),
        )
    assert torch.equal(run(f.model, f.inputs), before)


def test_knockout_torch_encoder_equals_hand() -> None:
    model = models.encoder().eval()
    src, padding = models.sequence(2, 5), models.padding([5, 3], 5)
    valid = ~padding
    edges = {0: [(1, 0), (2, 2)], 1: [(0, 1)]}
    with torch.no_grad():
        before = model(src, src_key_padding_mask=padding)
        hand = br.hand_encoder(model, src, padding, knockout=edges)
        named = {f"layers.{i}.self_attn": e for i, e in edges.items()}
        with attnscope.knockout(model, named), attnscope.capture(model) as attn:
            got = model(src, src_key_padding_mask=padding)
        after = model(src, src_key_padding_mask=padding)
    assert (hand.output - before)[valid].abs().max() > 1e-3
    close(got[valid], hand.output[valid])
    for i, e in edges.items():
        weights = attn[f"layers.{i}.self_attn"]
        for query, key in e:
            assert torch.all(weights[:, :, query, key] == 0)
        close(weights, br.zero_padded_rows(hand.weights[i], valid.long()))
    assert torch.equal(after, before)


def test_interventions_restore_the_model_after_an_exception() -> None:
    f = family("bert")
    before = run(f.model, f.inputs)
    layer = br.attention_names("bert")[0]
    for intervention in (
        lambda: attnscope.ablate(f.model, {layer: [0]}),
        lambda: attnscope.knockout(f.model, {layer: [(1, 1)]}),
    ):
        with pytest.raises(KeyError), intervention():
            f.model(**f.inputs)
            raise KeyError("user code failed")
        assert torch.equal(run(f.model, f.inputs), before)


# -- 7. bad input ------------------------------------------------------------------------------


def test_grads_without_a_backward_is_an_error() -> None:
    f = family("bert")
    with pytest.raises(AttnScopeError, match="backward"):
        with attnscope.capture(f.model, grads=True) as attn:
            f.model(**f.inputs)
        attn.grad(attn.names[0])


def test_grad_of_a_module_not_captured_or_without_grads_is_an_error() -> None:
    f = family("bert")
    with attnscope.capture(f.model, grads=True) as attn:
        loss_of(f.model(**f.inputs)).backward()
    with pytest.raises(AttnScopeError, match=r"encoder\.layer\.7"):
        attn.grad("encoder.layer.7.attention.self")
    with torch.no_grad(), attnscope.capture(f.model) as plain:
        f.model(**f.inputs)
    with pytest.raises(AttnScopeError, match="grads=True"):
        plain.grad(plain.names[0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m, n: attnscope.ablate(m, {n: [4]}), "head"),
        (lambda m, n: attnscope.ablate(m, {n: [0, 17]}), "head"),
        (lambda m, n: attnscope.ablate(m, {"encoder.layer.9.attention.self": [0]}), "layer.9"),
        (lambda m, n: attnscope.ablate(m, {n: [0]}, how="median"), "median"),
        (lambda m, n: attnscope.knockout(m, {n: [(0, 9)]}), "9"),
        (lambda m, n: attnscope.knockout(m, {n: [(12, 0)]}), "12"),
        (lambda m, n: attnscope.knockout(m, {"nope": [(0, 0)]}), "nope"),
    ],
    ids=["head-4", "head-17", "ablate-module", "how", "key-9", "query-12", "knockout-module"],
)
def test_intervention_bad_input_is_an_error(
    make: Callable[[nn.Module, str], Any], match: str
) -> None:
    f = family("bert")
    before = run(f.model, f.inputs)
    layer = br.attention_names("bert")[0]
    # raised on entry or, for positions, at the forward
    with pytest.raises(AttnScopeError, match=match), make(f.model, layer):
        f.model(**f.inputs)
    assert torch.equal(run(f.model, f.inputs), before)
