"""Sweep every model type of the installed transformers through ``attnscope.capture``.

The method of transformers' own ``test_modeling_common.py::test_attention_outputs``, one tiny
random model per model type (nothing is downloaded):

1. a tiny config: the model type's default config, shrunk by a generic rule over the common
   field names (hidden 32, 2 layers, 4 heads, intermediate 36, vocab 99, ...), sub-configs too;
2. the base model class (``AutoModel``'s class for the type, else ``<Name>Model`` beside the
   config), in eval mode, under the default attention implementation;
3. inputs of batch 2: token ids of length 7 with an ``attention_mask`` whose second row is
   right-padded to 5, ``decoder_input_ids`` of length 5 for encoder-decoders, tiny
   ``pixel_values`` / ``input_features`` / ``input_values`` for vision and audio models (the
   first candidate set of inputs that the model runs on is kept);
4. one forward without and one with ``attnscope.capture(model)``: the main output must be
   bit-identical (``torch.equal``);
5. a deep copy switched to eager attention (checked: where ``set_attn_implementation`` does
   nothing, every config is set), run with ``output_attentions=True``: what it returns that
   is attention weights (or pre-softmax scores whose softmax a captured map shows) is the
   reference. Each eager map, in order, is paired with the closest unused captured map
   that shows it (the same shape, flattened to (batch·heads, q, k), a trailing crop, or two
   eager maps side by side), on valid query rows, within 1e-4; captured maps left over are
   extras; eager maps with no captured map must come from modules in ``attn.skipped``.

Outcomes: exact, exact-extra, skipped, mismatch, capture-raised, output-changed,
no-reference, no-attention, not-runnable (tools/README.md says what each means).

Each model runs in a worker process (one per job) that imports torch and transformers once;
a per-model alarm turns a slow model into a result, and a hang or a crash of the worker
(segfault, out of memory) is caught by the parent, which records it and starts a new worker.

    python tools/sweep_transformers.py                      # everything, 1 job
    python tools/sweep_transformers.py --only bert,t5,vit   # a few model types
    python tools/sweep_transformers.py --limit 20 --jobs 2

Writes ``tools/results/sweep.csv`` and ``tools/results/sweep_summary.json``. A script, never
run by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

OUTCOMES = (
    "exact",
    "exact-extra",
    "skipped",
    "mismatch",
    "capture-raised",
    "output-changed",
    "no-reference",
    "no-attention",
    "not-runnable",
)
COLUMNS = (
    "model_type",
    "outcome",
    "detail",
    "n_maps",
    "max_diff",
    "extra_maps",
    "skipped",
    "seconds",
    "model_class",
    "attn_impl",
)
ATOL = 1e-4
BATCH, LENGTH, SHORT, DECODER_LENGTH = 2, 7, 5, 5
VOCAB = 99
MAX_PARAMS = 60_000_000  # a shrunk model above this kept a large field the shrinker missed
RESULT = "@@sweep-result@@ "
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------

LAYERS = 2
HEADS = 4
HIDDEN = 32
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 36  # 37 in transformers' testers; 36 keeps grouped-mm strides 16-byte aligned

_EXACT: dict[str, int] = {}
for _names, _value in (
    (
        "num_hidden_layers num_layers n_layer n_layers encoder_layers decoder_layers "
        "num_decoder_layers num_encoder_layers depth encoder_depth decoder_depth "
        "num_self_attends_per_block num_blocks num_text_layers num_vision_layers "
        "decoder_num_hidden_layers num_global_layers num_local_layers",
        LAYERS,
    ),
    (
        "num_attention_heads n_head n_heads num_heads encoder_attention_heads "
        "decoder_attention_heads num_encoder_attention_heads num_decoder_attention_heads "
        "decoder_num_attention_heads num_self_attention_heads num_cross_attention_heads",
        HEADS,
    ),
    (
        "hidden_size d_model n_embd dim embed_dim word_embed_proj_dim embedding_size "
        "embedding_dim projection_dim text_embed_dim vision_embed_dim d_embed emb_dim",
        HIDDEN,
    ),
    ("head_dim d_kv attention_head_dim kv_channels d_head", HEAD_DIM),
    (
        "qk_nope_head_dim qk_rope_head_dim v_head_dim index_head_dim linear_key_head_dim "
        "linear_value_head_dim",
        HEAD_DIM,
    ),
    ("qk_head_dim", 2 * HEAD_DIM),
    ("kv_lora_rank q_lora_rank", 16),
    (
        "intermediate_size ffn_dim encoder_ffn_dim decoder_ffn_dim d_ff n_inner mlp_dim "
        "moe_intermediate_size shared_expert_intermediate_size decoder_intermediate_size "
        "hidden_dim d_inner",
        INTERMEDIATE,
    ),
    ("vocab_size", VOCAB),
    (
        "max_position_embeddings n_positions max_target_positions n_ctx "
        "max_text_position_embeddings",
        64,
    ),
    ("max_source_positions", 32),
    ("num_experts num_local_experts n_routed_experts moe_num_experts", 4),
    ("num_experts_per_tok moe_topk top_k", 2),
    ("n_shared_experts num_shared_experts", 1),
    ("n_group topk_group", 1),
    ("first_k_dense_replace", 1),
    ("image_size", 32),
    ("patch_size", 4),
    ("sliding_window", 4),
    ("index_n_heads linear_num_key_heads linear_num_value_heads", 2),
    ("index_topk", 4),
    ("num_mel_bins feature_size input_feat_per_channel", 16),
    ("num_codebooks", 2),
    ("codebook_size", 64),
    ("num_queries num_latents", 8),
    ("num_position_embeddings", 64),
    ("image_seq_length", 4),
    ("num_frames frames_per_clip", 4),
    ("window_size", 4),
    ("rotary_dim", HEAD_DIM),
):
    for _name in _names.split():
        _EXACT[_name] = _value

_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
_WIDE = re.compile(r"(hidden_size|hidden_dim|embed_dim|_d_model)$")
_INDEX_LISTS = re.compile(r"(indexes|indices|index|_layers|layer_ids)$")
_SPECIAL_ID = re.compile(r"(token_id|token_index)$")
_STRUCTURAL = re.compile(r"(layer_types|block_types?|layers_block_type)$")
_VOCAB = re.compile(r"vocab_size(_per_layer_input)?$|vocab$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _overrides(config: Any) -> dict[str, Any]:
    """The shrunk values of one config's own fields (sub-configs aside)."""
    from transformers import PretrainedConfig

    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, PretrainedConfig):
            continue
        if key in _EXACT and _is_int(value) and value > _EXACT[key]:
            out[key] = _EXACT[key]
        elif key in _EXACT and isinstance(value, list | tuple) and value and key != "image_size":
            if all(_is_int(v) for v in value):  # per-stage lists (Swin, PVT, ...)
                target = 1 if "depth" in key or "layers" in key else _EXACT[key]
                if key in ("num_heads", "num_attention_heads"):
                    target = 2
                out[key] = type(value)(min(v, target) for v in value)
        elif _VOCAB.search(key) and _is_int(value) and value > VOCAB and key != "type_vocab_size":
            out[key] = VOCAB
        elif _WIDE.search(key) and _is_int(value) and value > HIDDEN:
            out[key] = HIDDEN
        elif key == "image_size" and isinstance(value, list | tuple):
            out[key] = type(value)(32 for _ in value)
        elif key == "depths" and isinstance(value, list | tuple):
            out[key] = type(value)(1 for _ in value)
        elif key in ("hidden_sizes", "conv_dim") and isinstance(value, list | tuple):
            out[key] = type(value)(min(v, 32) for v in value if _is_int(v))
        elif key in _KV_HEADS and _is_int(value):
            heads = fields.get("num_attention_heads") or fields.get("n_head") or value
            out[key] = HEADS if value >= heads else min(value, 2)
    for key, value in fields.items():
        if key in out or _STRUCTURAL.search(key):
            continue
        if _INDEX_LISTS.search(key) and isinstance(value, list | tuple):
            if value and all(_is_int(v) for v in value):
                kept = [v for v in value if v < LAYERS and v >= -LAYERS]
                out[key] = type(value)(kept or [LAYERS - 1])
        elif key == "insert_layer_id" and _is_int(value):
            out[key] = min(value, LAYERS - 1)
        elif key == "max_window_layers" and _is_int(value):
            out[key] = min(value, LAYERS)
        elif key.endswith("_period") and _is_int(value) and value > LAYERS:
            out[key] = LAYERS
            offset = key.replace("_period", "_offset")
            if _is_int(fields.get(offset)):
                out[offset] = min(fields[offset], LAYERS - 1)
    if "depths" in fields and _is_int(fields.get("window_size")):  # Swin-like stages
        out.update(patch_size=2, window_size=2)
    for key, value in fields.items():  # per-layer kinds: one layer of each (hybrids keep both)
        if (
            _STRUCTURAL.search(key)
            and isinstance(value, list | tuple)
            and value
            and all(isinstance(v, str) for v in value)
        ):
            out[key] = type(value)(_one_of_each(value))
    vocab = out.get("vocab_size", fields.get("vocab_size"))
    if _is_int(vocab):
        extra = 0
        for key, value in fields.items():
            if _SPECIAL_ID.search(key) and _is_int(value) and value >= vocab:
                fixed = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
                out[key] = fixed.get(key, fixed.get(key.replace("decoder_start", "bos")))
                if out[key] is None:
                    out[key] = vocab - 1 - extra  # image/audio placeholders: the top ids
                    extra += 1
            elif (
                _SPECIAL_ID.search(key)
                and isinstance(value, list)
                and value
                and all(_is_int(v) and v >= vocab for v in value)
            ):
                out[key] = [2]
    return out


def _one_of_each(kinds: Any) -> list[str]:
    """LAYERS per-layer kinds, the first ones that differ, an attending kind among them."""
    distinct = list(dict.fromkeys(kinds))
    chosen = distinct[:LAYERS]
    attending = [k for k in distinct if "attention" in k and "linear" not in k]
    if attending and not any(k in chosen for k in attending):
        chosen[-1] = attending[0]
    return (chosen * LAYERS)[:LAYERS]


def _sub_configs(config: Any) -> dict[str, Any]:
    from transformers import PretrainedConfig

    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


def _as_kwargs(config: Any) -> dict[str, Any]:
    kwargs = _overrides(config)
    for key, sub in _sub_configs(config).items():
        kwargs[key] = {"model_type": sub.model_type, **_as_kwargs(sub)}
    return kwargs


def _patch_in_place(config: Any) -> None:
    for key, value in _overrides(config).items():
        setattr(config, key, value)
    for sub in _sub_configs(config).values():
        _patch_in_place(sub)


def tiny_config(model_type: str) -> tuple[Any, str]:
    """The shrunk config and how it was made ("rebuilt" from kwargs, else "patched")."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    try:
        config = config_class(**_as_kwargs(default))
        how = "rebuilt"
    except Exception:
        config = config_class()
        _patch_in_place(config)
        how = "patched"
    for sub in [config, *_sub_configs(config).values()]:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout"):
            if isinstance(getattr(sub, key, None), float):
                setattr(sub, key, 0.0)
    return config, how


# --------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------


def model_class(model_type: str, config: Any) -> Any:
    """AutoModel's class for the type; else the base model class beside the config class."""
    import importlib

    import transformers
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(name, list | tuple):
        name = name[0]
    if name is not None:
        return getattr(transformers, name)
    config_class = type(config)
    module = config_class.__module__.replace(".configuration_", ".modeling_")
    try:
        namespace = vars(importlib.import_module(module))
    except ImportError as error:
        raise LookupError(f"no AutoModel class and no {module}: {error}") from error
    found = [
        value
        for value in namespace.values()
        if isinstance(value, type)
        and issubclass(value, PreTrainedModel)
        and getattr(getattr(value, "config_class", None), "__name__", None) == config_class.__name__
        and "pretrained" not in value.__name__.lower()
    ]
    if not found:
        raise LookupError(f"no AutoModel class and no model class for {config_class.__name__}")
    # the base class ("...Model", else any non-head class), else a task model ("...For...")
    found.sort(
        key=lambda c: ("For" in c.__name__, not c.__name__.endswith("Model"), len(c.__name__))
    )
    return found[0]


def _first(*values: Any, default: Any = None) -> Any:
    return next((v for v in values if v is not None), default)


def _sub(config: Any, *names: str) -> Any:
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def input_candidates(model: Any, config: Any) -> list[tuple[str, dict[str, Any]]]:
    """Sets of inputs to try, most wanted first: (description, kwargs)."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(0)
    text = _sub(config, "text_config", "decoder", "decoder_config")
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB
    top = max(4, min(int(vocab) - 4, VOCAB - 10))
    ids = torch.randint(3, top, (BATCH, LENGTH), generator=gen)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, SHORT:] = 0
    decoder_ids = torch.randint(3, top, (BATCH, DECODER_LENGTH), generator=gen)
    vision = _sub(config, "vision_config", "encoder", "encoder_config", "backbone_config")
    channels = _first(
        getattr(vision, "num_channels", None), getattr(config, "num_channels", None), default=3
    )
    size = _first(getattr(vision, "image_size", None), getattr(config, "image_size", None))
    size = 32 if size is None else size
    height, width = (size, size) if _is_int(size) else (int(size[0]), int(size[-1]))
    pixels = torch.randn(BATCH, channels, height, width, generator=gen)
    audio = _sub(config, "audio_config", "encoder", "encoder_config")
    bins = _first(
        getattr(audio, "num_mel_bins", None),
        getattr(audio, "feature_size", None),
        getattr(config, "num_mel_bins", None),
        getattr(config, "feature_size", None),
        default=16,
    )
    per_channel = getattr(audio, "input_feat_per_channel", None)
    if per_channel is not None:
        bins = per_channel * (getattr(audio, "input_channels", 1) or 1)
    source = _first(
        getattr(audio, "max_source_positions", None),
        getattr(config, "max_source_positions", None),
        default=32,
    )
    frames = 2 * source

    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    extras: dict[str, Any] = {}
    if encoder_decoder and "decoder_input_ids" in params:
        extras["decoder_input_ids"] = decoder_ids

    main = getattr(model, "main_input_name", "input_ids")
    with_text = {"input_ids": ids, "attention_mask": mask}
    candidates: list[tuple[str, dict[str, Any]]] = []

    def features(layout: str) -> Any:
        if layout == "bft":
            return torch.randn(BATCH, bins, frames, generator=gen)
        return torch.randn(BATCH, frames, bins, generator=gen)

    waves = torch.randn(BATCH, 4000, generator=gen)
    by_name = {  # for required arguments no candidate names: the same tiny inputs
        "input_ids": ids,
        "pixel_values": pixels,
        "input_features": features("bft"),
        "input_values": waves,
        "attention_mask": mask,
    }
    required = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    seen: set[tuple[str, ...]] = set()

    def add(description: str, **kwargs: Any) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        for name in required:
            if name not in kwargs:
                stem = next((n for n in by_name if name.endswith(n)), None)
                if stem is not None:
                    kwargs[name] = by_name[stem]
                    description += f" + {name}"
        key = tuple(sorted(f"{k}{tuple(getattr(v, 'shape', ()))}" for k, v in kwargs.items()))
        if kwargs and key not in seen:
            seen.add(key)
            candidates.append((description, {**kwargs, **extras}))

    if main == "pixel_values":
        add("pixel_values", pixel_values=pixels)
        add("pixel_values + text", pixel_values=pixels, **with_text)
        frames_in = _first(
            getattr(vision, "num_frames", None), getattr(config, "num_frames", None), default=2
        )
        video = pixels[:, None].expand(BATCH, int(frames_in), *pixels.shape[1:]).contiguous()
        add("pixel_values (batch, frames, channels, h, w)", pixel_values=video)
    elif main == "input_features":
        add("input_features (batch, bins, frames)", input_features=features("bft"))
        add("input_features (batch, frames, bins)", input_features=features("btf"))
    elif main == "input_values":
        add("input_values", input_values=waves)
        add("input_values (batch, 1, samples)", input_values=waves[:, None])
    add("text, padded", **with_text)
    add("text, padded + pixel_values", pixel_values=pixels, **with_text)
    add("text, unpadded", input_ids=ids)
    if "pixel_values" in params and main != "pixel_values":
        add("pixel_values", pixel_values=pixels)
    if "input_features" in params and main != "input_features":
        add("input_features", input_features=features("bft"))
        add("input_features + text", input_features=features("bft"), **with_text)
    if "pixel_values_videos" in params:
        frames_in = _first(
            getattr(vision, "frames_per_clip", None),
            getattr(vision, "num_frames", None),
            default=2,
        )
        clip = pixels[:, None].expand(BATCH, int(frames_in), *pixels.shape[1:]).contiguous()
        add("pixel_values_videos", pixel_values_videos=clip)
    if "hidden_states" in params and "grid_thw" in params:  # Qwen-VL-style patch encoders
        patch = _first(getattr(vision, "patch_size", None), default=14)
        patch = patch if _is_int(patch) else patch[0]
        temporal = _first(getattr(vision, "temporal_patch_size", None), default=1)
        depth = _first(
            getattr(vision, "in_channels", None), getattr(vision, "num_channels", None), default=3
        )
        merge = _first(getattr(vision, "spatial_merge_size", None), default=2)
        side = 2 * merge
        grid = torch.tensor([[1, side, side]] * BATCH)
        patches = torch.randn(BATCH * side * side, depth * temporal * patch * patch, generator=gen)
        add("flattened patches + grid_thw", hidden_states=patches, grid_thw=grid)
    if "past_values" in params:  # time series
        context = int(_first(getattr(config, "context_length", None), default=32))
        series = _first(getattr(config, "num_input_channels", None), default=1)
        add("past_values (batch, time, series)", past_values=torch.randn(BATCH, context, series))
        add("past_values (batch, time)", past_values=torch.randn(BATCH, context))
    if "inputs_embeds" in params:
        hidden = getattr(text, "hidden_size", None) or getattr(config, "hidden_size", HIDDEN)
        embeds = torch.randn(BATCH, LENGTH, hidden, generator=gen)
        add("inputs_embeds, padded", inputs_embeds=embeds, attention_mask=mask)
    return candidates


def main_tensor(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if hasattr(output, "values") else output
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        values = [v for _, v in output.items()] if hasattr(output, "items") else values
    if isinstance(values, list | tuple) or hasattr(values, "__iter__"):
        for value in values:
            found = main_tensor(value) if not isinstance(value, str) else None
            if found is not None:
                return found
    return None


def tensors(output: Any, prefix: str = "") -> dict[str, Any]:
    import torch

    if isinstance(output, torch.Tensor):
        return {prefix: output}
    found: dict[str, Any] = {}
    if hasattr(output, "items"):
        for key, value in output.items():
            found.update(tensors(value, f"{prefix}.{key}"))
    elif isinstance(output, list | tuple):
        for i, value in enumerate(output):
            found.update(tensors(value, f"{prefix}[{i}]"))
    return found


def _flat(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):  # pegasus_x returns {"global": ..., "local": ...}
        return [t for v in value.values() for t in _flat(v)]
    return []


def eager_attentions(output: Any) -> list[Any]:
    """Per-head weights an eager forward returned, in call order where the output says it."""
    if not hasattr(output, "items"):
        return []
    fields = dict(output.items())
    if fields.get("encoder_attentions") is not None or fields.get("cross_attentions"):
        encoder = _flat(fields.get("encoder_attentions"))
        decoder = _flat(fields.get("decoder_attentions"))
        cross = _flat(fields.get("cross_attentions"))
        if len(decoder) == len(cross):
            interleaved = [t for pair in zip(decoder, cross, strict=True) for t in pair]
        else:
            interleaved = decoder + cross
        rest = [
            t
            for key, value in fields.items()
            if "attentions" in key
            and key not in ("encoder_attentions", "decoder_attentions", "cross_attentions")
            for t in _flat(value)
        ]
        return encoder + interleaved + rest
    found: list[Any] = []
    for key, value in fields.items():
        if "attention" in key and "mask" not in key:
            found.extend(_flat(value))
        elif hasattr(value, "items"):
            found.extend(eager_attentions(value))
    return found


# --------------------------------------------------------------------------------------------
# One model type
# --------------------------------------------------------------------------------------------


class SweepTimeoutError(Exception):
    pass


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line}"[:300]


def _configs(model: Any) -> list[Any]:
    """The model's config, its sub-configs and every module's config, each once."""
    found: dict[int, Any] = {}

    def add(config: Any) -> None:
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation"):
            return
        found[id(config)] = config
        for sub in _sub_configs(config).values():
            add(sub)

    add(getattr(model, "config", None))
    for module in model.modules():
        add(getattr(module, "config", None))
    return list(found.values())


def _not_eager(model: Any) -> list[str]:
    """The configs of the model's modules that do not say eager ("Class=implementation")."""
    seen: dict[int, str] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", "eager")
        if implementation != "eager" and id(config) not in seen:
            seen[id(config)] = f"{type(config).__name__}={implementation}"
    return list(seen.values())


def _set_eager(configs: list[Any]) -> None:
    for config in configs:
        with contextlib.suppress(Exception):
            config._attn_implementation = "eager"


def eager_models(model: Any) -> Any:
    """The model under eager attention, in up to three ways, each with a note saying how it
    was made (None for the first). The sweep takes the first that returns attentions.

    1. a deep copy of the model that ran, switched with ``set_attn_implementation("eager")``
       and checked on every module's config: the switch can be a logged no-op (Falcon);
    2. the class built from its config under eager with the same weights, as transformers'
       own tests do: some models choose their attention classes when built (SAM's
       ``SamVisionSdpaAttention``), so a switched copy keeps them and returns nothing;
    3. where the switch did not take, a deep copy with every config set to eager."""
    import copy

    import torch

    eager = copy.deepcopy(model)
    why = "had no effect"
    try:
        eager.set_attn_implementation("eager")
    except Exception as error:
        why = f"raised {first_line(error)}"
    switched = not _not_eager(eager)
    if switched:
        yield eager, None
        why = "returned no attentions"
    del eager
    try:
        config = copy.deepcopy(model.config)
        _set_eager([config, *_sub_configs(config).values()])
        torch.manual_seed(0)
        try:
            rebuilt = type(model)._from_config(config, attn_implementation="eager")
        except Exception:
            rebuilt = type(model)(config)
        rebuilt.eval().load_state_dict(model.state_dict())  # strict: all the same weights
        left = _not_eager(rebuilt)
        if not left:
            yield rebuilt, f"eager built from the config (a copy switched to eager {why})"
        built = f"built under eager, still {', '.join(left[:3])}" if left else "built under eager"
    except Exception as error:
        built = f"building it under eager failed: {first_line(error)}"
    if switched:
        return
    eager = copy.deepcopy(model)
    _set_eager(_configs(eager))
    left = _not_eager(eager)
    if left:
        yield (
            eager,
            (
                f"eager could not be set (set_attn_implementation {why}; {built}; set on every "
                f"config, still {', '.join(left[:3])}): the reference is not eager's"
            ),
        )
    else:
        yield eager, f"eager set on every config (set_attn_implementation {why}; {built})"


def eager_reference(model: Any, inputs: dict[str, Any]) -> tuple[Any, list[Any], dict, str | None]:
    """(eager's output, the attentions it returned, who returned them, how eager was made) from
    the first of ``eager_models`` that returns attentions, else the last one tried; raises
    the first error where none ran."""
    import torch

    first_error: Exception | None = None
    ran: tuple[Any, list[Any], dict, str | None] | None = None
    for eager, note in eager_models(model):
        try:
            with torch.no_grad(), returned_by(eager) as owners:
                torch.manual_seed(0)
                output = eager(**inputs, output_attentions=True)
        except SweepTimeoutError:
            raise
        except Exception as error:
            first_error = first_error or error
            continue
        ran = output, eager_attentions(output), owners, note
        if ran[1]:
            break
    if ran is None:
        raise first_error or RuntimeError("no eager model could be made")
    return ran


@contextlib.contextmanager
def returned_by(model: Any) -> Any:
    """While it is open, {storage address: name of the innermost module whose output held a
    tensor on that storage}: who returned each eager map (views and slices included)."""
    owners: dict[int, str] = {}
    kept: list[Any] = []  # alive until the end, so no address is reused

    def hook(name: str) -> Any:
        def record(module: Any, args: Any, output: Any) -> None:
            for tensor in _flat(output):
                with contextlib.suppress(Exception):
                    address = tensor.untyped_storage().data_ptr()
                    if address and address not in owners:
                        owners[address] = name
                        kept.append(tensor)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield owners
    finally:
        for handle in handles:
            handle.remove()


def _owner(tensor: Any, owners: dict[int, str]) -> str | None:
    try:
        return owners.get(tensor.untyped_storage().data_ptr())
    except Exception:
        return None


# The reasons attnscope gives in attn.skipped (adapters/sdpa.py): no softmax at all is not a
# failure (linear or recurrent attention has no weights to capture); a softmax of a layout it
# does not map is one, whether nothing of the module was recorded ("<Class> computed its
# attention by hand, but its softmax has a layout attnscope does not map ...") or only part
# ("<Class>: its (batch, heads, query, key) softmaxes are recorded, but it also computed
# softmaxes of a layout attnscope does not map ...").
_NO_SOFTMAX = re.compile(r"^\w+ computed no softmax")
_UNMAPPED = re.compile(r"^\w+\b.*\bsoftmax(es)? (has|of) a layout attnscope does not map")
_UNMAPPED_SHAPES = re.compile(r"(?:query, key\): |left out: )(.*?) \(")


def skip_kind(why: str) -> str:
    """no-softmax, unmapped-layout (all or part of the module) or other (a kernel attnscope
    cannot see, ...)."""
    if _NO_SOFTMAX.search(why):
        return "no-softmax"
    if _UNMAPPED.search(why):
        return "unmapped-layout"
    return "other"


def _short_skip(why: str) -> str:
    cls = why.split(" ", 1)[0].rstrip(":")
    kind = skip_kind(why)
    if kind == "no-softmax":
        return f"{cls}: no softmax"
    if kind == "unmapped-layout":
        shapes = _UNMAPPED_SHAPES.search(why)
        part = "part of it: " if "are recorded, but" in why else ""
        layout = shapes.group(1) if shapes else "?"
        return f"{cls}: {part}softmax layout {layout} not mapped"[:120]
    return why[:120]


def _skips_note(skipped: dict[str, str]) -> str:
    return f"attn.skipped: {_counted([_short_skip(why) for why in skipped.values()])}"


def _counted(items: list[str], limit: int = 3) -> str:
    counts = Counter(items)
    text = ", ".join(f"{n}× {item}" if n > 1 else item for item, n in list(counts.items())[:limit])
    return text + (", ..." if len(counts) > limit else "")


def _pattern(name: str) -> str:
    """A module name with its layer numbers as *: vision_model.encoder.layers.*.self_attn."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name) or "(the model)"


def _masked_diff(got: Any, want: Any, mask: Any) -> float:
    """Max abs diff on the rows eager does not leave NaN and, for a self-attention map over
    the padded text, on its non-padded query rows; inf for a NaN or inf difference, and where
    no row is left to compare (nothing matches vacuously)."""
    import torch

    got, want = got.float(), want.float()
    rows = ~torch.isnan(want).any(dim=-1) & ~torch.isnan(got).any(dim=-1)  # NaN: not in view
    if (
        mask is not None
        and got.dim() == 4
        and got.size(0) == mask.size(0)
        and got.size(-2) == mask.size(1)
        and got.size(-1) == mask.size(1)
    ):
        rows = rows & mask.bool()[:, None, :].expand(rows.shape)
    if not rows.any():
        return float("inf")
    gap = (got[rows] - want[rows]).abs().max().item()
    return gap if gap == gap and gap != float("inf") else float("inf")


def views_of(got: Any, shape: tuple[int, ...], mask: Any = None) -> list[tuple[str, Any]]:
    """The ways a captured (batch, heads, query, key) map can show an eager map of ``shape``:
    the same shape; flattened to (batch·heads, query, key) for a 3-D eager map (the SAM-family
    layout); its trailing (query, key) block when batch and heads agree and eager's map is
    smaller (an output that crops off prepended positions, CPM-Ant's prompt); a sliding-window
    band (batch, heads, query, 2w + 1), offset j of query i at key i + j - w (Longformer, LED);
    local blocks (batch, blocks, heads, L, 3L), block n's queries over the blocks n - 1 to n + 1
    (LongT5); global and local blocks (batch, heads, blocks, L, G + L), each block's queries over
    G global keys then their own block (PEGASUS-X). Rows a view cannot show (eager's padding
    beyond the captured length, and, given the 2-D padding ``mask``, padded queries, whose rows
    a capture leaves zero) are NaN and not compared."""
    import torch

    found: list[tuple[str, Any]] = []
    if bool(torch.isnan(got).any()):
        return found  # a capture never leaves NaN: such a map shows nothing
    if tuple(got.shape) == shape:
        found.append(("same", got))
    if got.dim() == 4 and len(shape) == 3 and tuple(got.flatten(0, 1).shape) == shape:
        found.append(("batch·heads", got.flatten(0, 1)))
    square = got.dim() == 4 and got.size(-1) == got.size(-2)
    if (
        got.dim() == 4
        and len(shape) == 4
        and tuple(got.shape[:2]) == shape[:2]
        and got.size(-2) >= shape[-2]
        and got.size(-1) >= shape[-1]
        and tuple(got.shape) != shape
    ):
        found.append(
            ("trailing crop", got[..., got.size(-2) - shape[-2] :, got.size(-1) - shape[-1] :])
        )
    if (
        square
        and len(shape) == 4
        and tuple(got.shape[:2]) == shape[:2]
        and shape[-1] % 2
        and 3 <= shape[-1] != got.size(-1)
    ):
        length, queries, width = got.size(-1), shape[-2], shape[-1]
        if queries <= length and tuple(got.shape) != shape:
            keys = torch.arange(queries)[:, None] + torch.arange(width) - width // 2
            inside = (keys >= 0) & (keys < length)
            index = keys.clamp(0, length - 1).expand(*shape)
            band = got[:, :, :queries].gather(-1, index) * inside
            found.append(("sliding-window band", band))
    if square and len(shape) == 5 and shape[0] == got.size(0) and shape[2] == got.size(1):
        batch, blocks, heads, size, keys = shape
        length = got.size(-1)
        if keys == 3 * size and length <= blocks * size:
            padded = got.new_full((batch, heads, blocks * size, (blocks + 2) * size), float("nan"))
            padded[:, :, :length, :] = 0.0
            padded[:, :, :length, size : size + length] = got
            if mask is not None and tuple(mask.shape) == (batch, length):
                padded[:, :, :length][~mask.bool()[:, None, :].expand(batch, heads, length)] = (
                    float("nan")
                )
            local = torch.stack(
                [
                    padded[:, :, n * size : (n + 1) * size, n * size : (n + 3) * size]
                    for n in range(blocks)
                ],
                dim=1,
            )
            found.append(("local blocks", local))
    if got.dim() == 4 and len(shape) == 5 and tuple(shape[:2]) == tuple(got.shape[:2]):
        batch, heads, blocks, size, keys = shape
        extra = keys - size  # global keys ahead of each block's own
        length = blocks * size
        if extra >= 0 and got.size(-2) == length and got.size(-1) == extra + length:
            rows = got.reshape(batch, heads, blocks, size, extra + length)
            own = torch.stack(
                [
                    rows[:, :, n, :, extra + n * size : extra + (n + 1) * size]
                    for n in range(blocks)
                ],
                dim=2,
            )
            found.append(("global and local blocks", torch.cat([rows[..., :extra], own], -1)))
    return found


def is_weights(tensor: Any) -> bool:
    """Attention weights: at least 3-D, every row that is not NaN non-negative and summing to at
    most 1 (a crop or a sink may take some mass away; nothing adds any)."""
    import torch

    if tensor.dim() < 3 or not tensor.is_floating_point():
        return False
    rows = tensor.detach().float().reshape(-1, tensor.size(-1))
    rows = rows[~torch.isnan(rows).any(dim=-1)]
    return bool(rows.numel()) and bool((rows >= 0).all()) and bool((rows.sum(-1) <= 1 + 1e-3).all())


def references(
    returned: list[Any], captured: list[Any], mask: Any
) -> tuple[list[Any], list[Any], int, list[str]]:
    """(the eager maps to compare with, the returned tensor each comes from, how many of them
    are softmaxed scores, the shapes of what eager returned that is no attention weights).

    Weights are kept as they are. A tensor of 3 or more dims that is not weights, but whose
    softmax over the last axis matches a captured map in a view of ``views_of``, is pre-softmax
    scores returned as attentions (SqueezeBERT, ProphetNet): its softmax is the reference.
    Anything else (hidden states, a recurrent state, groupings over another axis, a map that
    is NaN throughout) is no reference."""
    import torch

    kept, origins, scores, dropped = [], [], 0, []
    for tensor in returned:
        if tensor.is_floating_point() and bool(torch.isnan(tensor).all()):
            dropped.append(f"{tuple(tensor.shape)} all NaN")
            continue
        if is_weights(tensor):
            kept.append(tensor)
            origins.append(tensor)
            continue
        if tensor.dim() >= 3 and tensor.is_floating_point():
            soft = tensor.detach().float().softmax(-1)
            shape = tuple(soft.shape)
            views = (v for got in captured for v in views_of(got, shape, mask))
            if any(_masked_diff(v[1], soft, mask) <= ATOL for v in views):
                kept.append(soft)
                origins.append(tensor)
                scores += 1
                continue
        dropped.append(str(tuple(tensor.shape)))
    return kept, origins, scores, dropped


def pair(captured: list[Any], refs: list[Any], mask: Any) -> dict[str, Any]:
    """Pairs from the reference side: each eager map, in order, takes the unused captured map
    closest to it in one of the views of ``views_of``, or, with the next eager map, one
    captured map whose keys are the two maps' keys side by side (one call over
    [self keys, cross keys] that eager splits in two, T5Gemma2's merged attention).

    Returns worst (max diff over the pairs, None without any), unmatched (eager maps with no
    captured map), extra (captured maps no eager map took) and views (how often each view
    other than "same" was used)."""
    unused = list(range(len(captured)))
    worst: float | None = None
    unmatched: list[int] = []
    views: Counter[str] = Counter()
    i = 0
    while i < len(refs):
        want = refs[i]
        best: tuple[float, int, str] | None = None
        for j in unused:
            for how, view in views_of(captured[j], tuple(want.shape), mask):
                gap = _masked_diff(view, want, mask)
                if best is None or gap < best[0]:
                    best = (gap, j, how)
        after = refs[i + 1] if i + 1 < len(refs) else None
        if after is not None and want.dim() == 4 and after.shape[:-1] == want.shape[:-1]:
            keys = want.size(-1)
            for j in unused:
                got = captured[j]
                if (
                    got.dim() == 4
                    and got.shape[:-1] == want.shape[:-1]
                    and got.size(-1) == keys + after.size(-1)
                ):
                    gap = max(
                        _masked_diff(got[..., :keys], want, mask),
                        _masked_diff(got[..., keys:], after, mask),
                    )
                    if best is None or gap < best[0]:
                        best = (gap, j, "two eager maps side by side")
        if best is None:
            unmatched.append(i)
            i += 1
            continue
        gap, j, how = best
        worst = gap if worst is None else max(worst, gap)
        unused.remove(j)
        if how != "same":
            views[how] += 1
        i += 2 if how == "two eager maps side by side" else 1
    return {"worst": worst, "unmatched": unmatched, "extra": unused, "views": views}


def judge(
    captured: list[tuple[str, Any]],
    returned: list[Any],
    owners: dict[int, str],
    skipped: dict[str, str],
    mask: Any,
) -> tuple[str, list[str], float | None, int]:
    """The outcome of comparing the captured maps [(module name, map)] with what eager
    returned: (outcome, notes for the detail, max diff over the pairs, extra captured maps)."""
    maps = [w for _, w in captured]
    refs, origins, scores, dropped = references(returned, maps, mask)
    notes: list[str] = []
    if scores:
        notes.append(f"{scores} eager maps are pre-softmax scores: compared after a softmax")
    if dropped:
        notes.append(
            f"{len(dropped)} eager 'attentions' are no attention weights, left out "
            f"({_counted(dropped, 2)})"
        )
    if skipped:
        notes.append(_skips_note(skipped))
    if not refs:
        if maps:
            notes.insert(
                0,
                f"eager returns no attention weights to compare with; capture recorded "
                f"{len(maps)} maps",
            )
            return "no-reference", notes, None, 0
        if skipped:
            return "skipped", notes, None, 0
        notes.insert(0, "eager returned no attention weights and capture recorded none")
        return "no-attention", notes, None, 0

    paired = pair(maps, refs, mask)
    worst = paired["worst"]
    if paired["views"]:
        notes.append("paired through " + ", ".join(f"{v} ×{n}" for v, n in paired["views"].items()))
    extra = paired["extra"]
    if extra:
        names = [_pattern(captured[j][0]) for j in extra]
        notes.append(f"{len(extra)} captured maps eager does not return: {_counted(names)}")

    def owner(i: int) -> str:
        return _owner(origins[i], owners) or ""

    def in_skipped(i: int) -> bool:  # returned by a skipped module, one inside it, or around it
        name = owner(i)
        return bool(name) and any(
            name == s or name.startswith(s + ".") or s.startswith(name + ".") for s in skipped
        )

    unmatched = paired["unmatched"]
    unexplained = [i for i in unmatched if not in_skipped(i)]
    if unmatched:
        shapes = [str(tuple(refs[i].shape)) for i in unmatched]
        owners_of = [_pattern(owner(i)) for i in unmatched]
        what = (
            f"{len(unmatched)} of {len(refs)} eager maps have no captured map"
            if maps
            else f"captured nothing; eager returned {len(refs)} maps"
        )
        notes.insert(
            0,
            f"{what} ({_counted(shapes, 2)}, returned by {_counted(owners_of, 2)}; "
            f"{len(unmatched) - len(unexplained)} of them by modules in attn.skipped)",
        )
    if worst is not None and worst > ATOL:
        notes.insert(0, f"max diff {worst:.3g}")
        return "mismatch", notes, worst, len(extra)
    if unexplained:
        return "mismatch", notes, worst, len(extra)
    if skipped:
        return "skipped", notes, worst, len(extra)
    return ("exact-extra" if extra else "exact"), notes, worst, len(extra)


class NotRunnableError(Exception):
    pass


def _rope_dicts(config: Any) -> list[dict[str, Any]]:
    """The rotary settings of the config and its sub-configs (per-layer-kind ones too)."""
    found = []
    for key in ("rope_parameters", "rope_scaling"):
        value = getattr(config, key, None)
        if isinstance(value, dict):
            found.append(value)
            found.extend(v for v in value.values() if isinstance(v, dict))
    for sub in _sub_configs(config).values():
        found.extend(_rope_dicts(sub))
    return found


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, every part at least 1 where possible."""
    floor = 1 if total >= len(weights) else 0
    parts = [max(floor, total * w // sum(weights)) for w in weights]
    while sum(parts) > total and max(parts) > floor:
        parts[parts.index(max(parts))] -= 1
    while sum(parts) < total:
        parts[parts.index(min(parts))] += 1
    return parts


def repair(config: Any, error: BaseException) -> str | None:
    """Fix the config for an error a shrunk config is known to cause; what was done, or None."""
    text = str(error)
    match = re.search(r"split_sizes to sum exactly to (\d+).*split_sizes=\[([\d, ]+)\]", text)
    if match:  # multimodal rotary sections sized for the original head_dim
        total = int(match.group(1))
        section = _split(total, [int(v) for v in match.group(2).split(",")])
        done = False
        for rope in _rope_dicts(config):
            if rope.get("mrope_section") not in (None, section) or "rope_type" in rope:
                rope["mrope_section"] = section
                done = True
        return f"mrope_section {section}" if done else None
    match = re.search(r"multiple of the number of attention heads \(?(\d+)", text)
    if match:
        heads, done = int(match.group(1)), False
        for sub in [config, *_sub_configs(config).values()]:
            for key, value in vars(sub).items():
                if key.endswith("heads") and value == heads:
                    setattr(sub, key, HEADS)
                    done = True
        return f"{heads} heads set to {HEADS}" if done else None
    if "sliding_window" in text and "not set" in text:
        for sub in [config, *_sub_configs(config).values()]:
            sub.sliding_window = 4
        return "sliding_window set"
    return None


def build_and_run(model_type: str, state: dict[str, Any]) -> tuple[Any, Any, dict, Any]:
    """The tiny model, its config, the inputs it runs on and its plain output."""
    import torch

    state["stage"] = "making the config"
    config, how = tiny_config(model_type)
    state["stage"] = "looking up the model class"
    cls = model_class(model_type, config)
    state["model_class"] = cls.__name__
    repairs: list[str] = []
    for _ in range(4):
        try:
            state["stage"] = "building the model"
            with torch.device("meta"):
                meta = cls(config)
            params = sum(p.numel() for p in meta.parameters())
            del meta
            if params > MAX_PARAMS:
                raise NotRunnableError(f"still {params / 1e6:.0f}M parameters after shrinking")
            torch.manual_seed(0)
            model = cls(config).eval()
            state["stage"] = "running the model"
            errors = []
            for description, candidate in input_candidates(model, config):
                try:
                    with torch.no_grad():
                        torch.manual_seed(0)
                        return model, config, candidate, model(**candidate)
                except SweepTimeoutError:
                    raise
                except Exception as error:
                    errors.append(error)
                    print(f"  [{description}] {first_line(error)}", file=sys.stderr)
            if not errors:
                raise NotRunnableError("no inputs this script knows how to make")
            raise errors[0]
        except (SweepTimeoutError, NotRunnableError):
            raise
        except Exception as error:
            fixed = repair(config, error)
            if fixed is None or fixed in repairs:
                note = f" after {', '.join(repairs)}" if repairs else ""
                raise NotRunnableError(
                    f"{state['stage']} ({how} config{note}): {first_line(error)}"
                ) from error
            repairs.append(fixed)
    raise NotRunnableError(f"{state['stage']}: gave up after {', '.join(repairs)}")


def run_one(model_type: str, timeout: float) -> dict[str, Any]:
    import signal

    import torch

    import attnscope

    result: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    result.update(model_type=model_type, outcome="not-runnable")
    state: dict[str, Any] = {"stage": "starting"}

    def alarm(signum: int, frame: Any) -> None:
        raise SweepTimeoutError(f"timed out after {timeout:g} s while {state['stage']}")

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.perf_counter()
    try:
        model, _config, inputs, plain = build_and_run(model_type, state)
        result["attn_impl"] = str(getattr(model.config, "_attn_implementation", ""))

        state["stage"] = "running eager"
        returned: list[Any] = []
        owners: dict[int, str] = {}
        eager_notes: list[str] = []
        eager_error = None
        suspect = False  # the eager model computes something else than the default one
        try:
            eager_out, returned, owners, eager_note = eager_reference(model, inputs)
            if eager_note:
                eager_notes.append(eager_note)
            # A reference is only as good as the eager implementation's agreement with the
            # default one: say so where the two models disagree.
            ours, theirs = main_tensor(plain), main_tensor(eager_out)
            if ours is not None and theirs is not None and ours.shape == theirs.shape:
                gap = (ours.float() - theirs.float()).abs().max().item()
                if bool(torch.isnan(theirs).any()) and not bool(torch.isnan(ours).any()):
                    suspect = True
                    eager_notes.append("eager model's own output has NaN; the default's has none")
                elif gap > 1e-3:
                    suspect = True
                    eager_notes.append(
                        f"eager model's own output differs from the default's by {gap:.3g}"
                    )
        except SweepTimeoutError:
            raise
        except Exception as error:
            returned, eager_error = [], first_line(error)

        state["stage"] = "capturing"
        try:
            with torch.no_grad(), attnscope.capture(model) as attn:
                torch.manual_seed(0)
                out = model(**inputs)
        except SweepTimeoutError:
            raise
        except Exception as error:
            if "found no attention module" in str(error) and not any(map(is_weights, returned)):
                result["outcome"] = "no-attention"
                said = (
                    f"eager failed ({eager_error})"
                    if eager_error
                    else "eager returned no attention weights"
                )
                result["detail"] = f"{said}; capture: {first_line(error)}"
            else:
                result["outcome"] = "capture-raised"
                result["detail"] = first_line(error)
            return result
        captured = [(name, w) for name in attn.names for w in attn.calls(name)]
        result["n_maps"] = len(captured)
        skipped = attn.skipped
        kinds = Counter(skip_kind(why) for why in skipped.values())
        result["skipped"] = " ".join(f"{kind}:{n}" for kind, n in sorted(kinds.items()))

        state["stage"] = "comparing"
        expected, got = main_tensor(plain), main_tensor(out)
        if expected is None or got is None or not torch.equal(expected, got):
            result["outcome"] = "output-changed"
            if expected is not None and got is not None and expected.shape == got.shape:
                change = (expected.float() - got.float()).abs().max().item()
                result["detail"] = f"main output differs by up to {change:.3g}"
            else:
                result["detail"] = "main output missing or reshaped"
            return result
        others = tensors(plain)
        changed = [
            key
            for key, value in tensors(out).items()
            if key in others and not torch.equal(others[key], value)
        ]
        if changed:
            eager_notes.append(f"other outputs changed: {', '.join(changed[:3])}")
        if eager_error is not None:
            result["outcome"] = "no-reference"
            notes = [
                f"eager forward with output_attentions failed ({eager_error}); capture "
                f"recorded {len(captured)} maps"
            ]
            if skipped:
                notes.append(_skips_note(skipped))
        else:
            outcome, notes, worst, extra = judge(
                captured, returned, owners, skipped, inputs.get("attention_mask")
            )
            if suspect and outcome == "mismatch":  # its weights are another model's
                outcome = "no-reference"
                notes.insert(0, "eager's weights belong to a model that computes otherwise")
            result.update(outcome=outcome, extra_maps=extra)
            if worst is not None:
                result["max_diff"] = f"{worst:.3g}"
        result["detail"] = "; ".join([*notes, *eager_notes])[:600]
        return result
    except SweepTimeoutError as error:
        result["detail"] = str(error)
        return result
    except NotRunnableError as error:
        result["detail"] = str(error)[:400]
        return result
    except Exception as error:
        result["detail"] = f"{state['stage']}: {first_line(error)}"[:400]
        return result
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        result["seconds"] = f"{time.perf_counter() - start:.2f}"
        result["model_class"] = state.get("model_class", "")


def worker(timeout: float) -> None:
    """Read model types on stdin, answer one result line each on the original stdout."""
    import logging
    import warnings

    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # a model's print() goes to the log, not into the answers
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    for line in sys.stdin:
        model_type = line.strip()
        if not model_type:
            continue
        print(f"=== {model_type}", file=sys.stderr, flush=True)
        result = run_one(model_type, timeout)
        answer.write(RESULT + json.dumps(result) + "\n")


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, timeout: float, log: Any) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--timeout", str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.done = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                self.lines.put(line[len(RESULT) :])
        self.lines.put(None)

    def ask(self, model_type: str, wait: float) -> dict[str, Any] | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(model_type + "\n")
        self.proc.stdin.flush()
        self.done += 1
        line = self.lines.get(timeout=wait)
        return None if line is None else json.loads(line)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()  # our own child, by its handle
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


def all_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def sweep(args: argparse.Namespace) -> int:
    types = all_model_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            print(f"unknown model types: {', '.join(unknown)}", file=sys.stderr)
            return 2
        types = wanted
    if args.limit:
        types = types[: args.limit]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(args.worker_log, "a") if args.worker_log else subprocess.DEVNULL  # noqa: SIM115
    todo: queue.Queue[str] = queue.Queue()
    for model_type in types:
        todo.put(model_type)
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + args.max_minutes * 60

    def record(result: dict[str, Any]) -> None:
        with lock:
            results[result["model_type"]] = result
            n = len(results)
            print(
                f"[{n}/{len(types)} {time.monotonic() - start:6.0f}s] {result['model_type']}: "
                f"{result['outcome']} {result['detail']}"[:240],
                flush=True,
            )
            if n % 10 == 0:
                write_csv(out_dir / "sweep.csv", results)

    def slot() -> None:
        current: Worker | None = None
        while True:
            try:
                model_type = todo.get_nowait()
            except queue.Empty:
                break
            began = time.monotonic()
            if began > deadline:
                record(blank(model_type, f"not run: the sweep's {args.max_minutes:g} min cap"))
                continue
            if current is None or current.done >= args.recycle:
                if current is not None:
                    current.stop()
                current = Worker(args.timeout, log)
            try:
                result = current.ask(model_type, args.timeout + 60)
            except queue.Empty:
                result = None
                why = f"worker hung past {args.timeout + 60:g} s; killed"
            else:
                why = ""
            if result is None:
                if not why:
                    current.proc.wait(timeout=30)
                    why = f"worker died (exit {current.proc.returncode})"
                current.stop()
                current = None
                result = blank(model_type, why)
                result["seconds"] = f"{time.monotonic() - began:.2f}"
            record(result)
        if current is not None:
            current.stop()

    threads = [threading.Thread(target=slot) for _ in range(max(1, args.jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - start
    write_csv(out_dir / "sweep.csv", results)
    write_summary(out_dir / "sweep_summary.json", results, wall, args)
    counts = Counter(r["outcome"] for r in results.values())
    print(json.dumps({k: counts.get(k, 0) for k in OUTCOMES}), f"in {wall:.0f} s")
    failures = issue_failures(results)
    print(
        f"issue #14 failures: {failures['failures']} of {failures['runnable_with_attention']} "
        f"runnable model types with attention ({json.dumps(failures['by_kind'])}); "
        f"no reference: {len(failures['no_reference'])}"
    )
    return 0


def blank(model_type: str, detail: str) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(model_type=model_type, outcome="not-runnable", detail=detail, seconds="0")
    return row


def write_csv(path: Path, results: dict[str, dict[str, Any]]) -> None:
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for model_type in sorted(results):
            writer.writerow(results[model_type])
    os.replace(temporary, path)


def issue_failures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Failures as issue #14 defines them, among the runnable model types with attention (all
    but not-runnable, no-attention and no-reference): mismatch, capture-raised,
    output-changed, and skipped where a skipped module computed a softmax (a module listed in
    attn.skipped is a failure unless it computes no softmax)."""
    judged = ("exact", "exact-extra", "skipped", "mismatch", "capture-raised", "output-changed")
    rows = {t: r for t, r in results.items() if r["outcome"] in judged}

    def skip_failure(row: dict[str, Any]) -> str | None:
        kinds = {kind.split(":")[0] for kind in row["skipped"].split()} - {"no-softmax"}
        if not kinds:
            return None
        return "skipped (unmapped layout)" if kinds == {"unmapped-layout"} else "skipped (other)"

    failing = {
        t: r["outcome"] if r["outcome"] != "skipped" else skip_failure(r)
        for t, r in rows.items()
        if r["outcome"] in ("mismatch", "capture-raised", "output-changed")
        or (r["outcome"] == "skipped" and skip_failure(r))
    }
    return {
        "runnable_with_attention": len(rows),
        "failures": len(failing),
        "by_kind": dict(Counter(failing.values())),
        "model_types": dict(sorted(failing.items())),
        "skipped_no_softmax_only": sorted(
            t for t, r in rows.items() if r["outcome"] == "skipped" and not skip_failure(r)
        ),
        "no_reference": sorted(t for t, r in results.items() if r["outcome"] == "no-reference"),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10
        ).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_summary(
    path: Path, results: dict[str, dict[str, Any]], wall: float, args: argparse.Namespace
) -> None:
    import torch
    import transformers

    import attnscope

    counts = Counter(r["outcome"] for r in results.values())
    package = str(Path(attnscope.__file__).resolve().parent)  # the attnscope the workers ran
    uncommitted = _git("-C", package, "status", "--porcelain", "--", ".")  # a dirty tree
    summary = {
        "counts": {k: counts.get(k, 0) for k in OUTCOMES},
        "model_types": len(results),
        "issue_failures": issue_failures(results),
        "not_exact": {
            outcome: sorted(t for t, r in results.items() if r["outcome"] == outcome)
            for outcome in OUTCOMES
            if outcome not in ("exact", "not-runnable")
        },
        "attnscope": attnscope.__version__,
        "attnscope_path": package,
        "attnscope_commit": _git("-C", package, "rev-parse", "--short", "HEAD") or None,
        "attnscope_uncommitted": [line for line in uncommitted.splitlines() if line],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(wall, 1),
        "jobs": args.jobs,
        "per_model_timeout_s": args.timeout,
        "atol": ATOL,
        "only": args.only or None,
        "limit": args.limit or None,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="the first N model types only")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=45.0, help="seconds per model type")
    parser.add_argument("--max-minutes", type=float, default=40.0, help="cap on the sweep")
    parser.add_argument("--recycle", type=int, default=50, help="new worker after N models")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the results")
    parser.add_argument("--worker-log", help="append the workers' stderr to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.timeout)
        return 0
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
