"""Tiny random Hugging Face models of each family, built from configs (nothing downloaded)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

transformers = __import__("pytest").importorskip("transformers")


@dataclass
class Family:
    name: str
    model: nn.Module  # default implementation (sdpa)
    eager: nn.Module  # same weights, eager
    inputs: dict[str, Any]
    kinds: list[str]  # expected kind of each captured name, in call order
    heads: int


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    model.eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager


def _ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _right_padding(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


def _left_padding(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    return _right_padding(batch, length, lengths).flip(-1)


def build(name: str) -> Family:
    torch.manual_seed(0)
    t = transformers
    small = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
    )
    ids = _ids(99, 2, 9)
    if name in ("bert", "roberta"):
        config_cls, model_cls = (
            (t.BertConfig, t.BertModel) if name == "bert" else (t.RobertaConfig, t.RobertaModel)
        )
        model, eager = _pair(model_cls(config_cls(**small)))
        mask = _right_padding(2, 9, [9, 6])
        return Family(
            name, model, eager, {"input_ids": ids, "attention_mask": mask}, ["self"] * 2, 4
        )
    if name == "distilbert":
        config = t.DistilBertConfig(
            vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64
        )
        model, eager = _pair(t.DistilBertModel(config))
        mask = _right_padding(2, 9, [9, 5])
        return Family(
            name, model, eager, {"input_ids": ids, "attention_mask": mask}, ["self"] * 2, 4
        )
    if name == "gpt2":
        config = t.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model, eager = _pair(t.GPT2Model(config))
        mask = _left_padding(2, 9, [9, 6])
        return Family(
            name, model, eager, {"input_ids": ids, "attention_mask": mask}, ["causal"] * 2, 4
        )
    if name in ("llama", "mistral"):
        extra = {"sliding_window": 4} if name == "mistral" else {}
        config_cls, model_cls = (
            (t.LlamaConfig, t.LlamaModel) if name == "llama" else (t.MistralConfig, t.MistralModel)
        )
        config = config_cls(num_key_value_heads=2, head_dim=8, **small, **extra)
        model, eager = _pair(model_cls(config))
        mask = _left_padding(2, 9, [9, 7])
        return Family(
            name, model, eager, {"input_ids": ids, "attention_mask": mask}, ["causal"] * 2, 4
        )
    if name in ("bart", "t5"):
        if name == "bart":
            config = t.BartConfig(
                vocab_size=99,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=37,
                decoder_ffn_dim=37,
                max_position_embeddings=64,
            )
            model, eager = _pair(t.BartModel(config))
        else:
            config = t.T5Config(
                vocab_size=99,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
            )
            model, eager = _pair(t.T5Model(config))
        inputs = {
            "input_ids": ids,
            "attention_mask": _right_padding(2, 9, [9, 6]),
            "decoder_input_ids": _ids(99, 2, 5, seed=1),
        }
        kinds = ["self", "self", "causal", "cross", "causal", "cross"]
        return Family(name, model, eager, inputs, kinds, 4)
    if name == "vit":
        config = t.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            **{
                k: v for k, v in small.items() if k not in ("vocab_size", "max_position_embeddings")
            },
        )
        model, eager = _pair(t.ViTModel(config))
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        return Family(name, model, eager, {"pixel_values": pixels}, ["self"] * 2, 4)
    raise ValueError(name)


FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "bart", "t5", "vit")


def eager_attentions(family: Family) -> list[torch.Tensor]:
    """The eager implementation's own per-head weights, in call order."""
    with torch.no_grad():
        out = family.eager(**family.inputs, output_attentions=True)
    if getattr(out, "encoder_attentions", None) is not None:
        encoder = list(out.encoder_attentions)
        decoder = [
            w
            for pair in zip(out.decoder_attentions, out.cross_attentions, strict=True)
            for w in pair
        ]
        return encoder + decoder
    return list(out.attentions)


def valid_queries(family: Family, kind: str, query_len: int) -> torch.Tensor | None:
    """(batch, query) bool of the query rows that are not padding, or None for all."""
    mask = family.inputs.get("attention_mask")
    if (
        mask is None
        or kind == "cross"
        or (kind == "causal" and "decoder_input_ids" in family.inputs)
    ):
        return None
    assert mask.size(1) == query_len
    return mask.bool()
