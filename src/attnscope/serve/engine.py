"""The model behind ``attnscope serve``: one capture per request, one request at a time.

Design note
-----------
The model is loaded once, through ``attnscope run``'s loader (local folders only, nothing
downloaded). A capture observes every attention call made while it is open, in any thread, so
two overlapping captures would record each other's calls: ``Explorer.capture`` takes a lock
around tokenising, the capture and the forward pass, and each request gets a capture of its
own. The labelled maps are then turned into the page's data outside the lock.

Encoder models get one forward pass (lazily captured, so the page has its query/key view).
Encoder-decoder models get the target text (or the start token) as the decoder's input.
Causal language models may also ``generate`` greedily; the KV-cache steps are stitched into
one (prompt + generated, prompt + generated) map per module (``AttentionMaps.display``).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from ..capture import capture
from ..errors import AttnScopeError
from ..head_stats import head_stats
from ..maps import AttentionMaps
from ..run import _load, _tokenize, default_model_path
from ..view import _table as stats_table
from ..view import page_data

MAX_CHARS = 20_000  # characters of one text field, before any tokenising
MAX_NEW_TOKENS = 64
_CAUSAL = ("ForCausalLM", "LMHeadModel")


class LengthError(AttnScopeError):
    """The input is over a length limit (the server answers 413 with this message)."""


class Explorer:
    """A loaded model that turns a text into the page's data (``capture``)."""

    def __init__(self, model: str | None = None, *, max_tokens: int | None = None) -> None:
        self.model_path = model or default_model_path()
        tokenizer, loaded = _load(self.model_path)
        config = loaded.config
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.causal = not self.encoder_decoder and any(
            str(a).endswith(_CAUSAL) for a in getattr(config, "architectures", None) or []
        )
        if self.causal:  # run's loader gives the bare model; generation needs the LM head
            import transformers

            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                Path(self.model_path), local_files_only=True
            ).eval()
        self.tokenizer, self.model = tokenizer, loaded
        self.max_tokens = _limit(tokenizer, loaded, max_tokens)
        self.name = "all-MiniLM-L6-v2" if model is None else Path(self.model_path).name
        self._lock = threading.Lock()

    def describe(self) -> dict[str, object]:
        """What the page's form offers for this model."""
        return {
            "model": self.name,
            "encoder_decoder": self.encoder_decoder,
            "causal": self.causal,
            "max_tokens": self.max_tokens,
            "max_chars": MAX_CHARS,
            "max_new_tokens": MAX_NEW_TOKENS if self.causal else 0,
        }

    def capture(
        self,
        text: object,
        text_pair: object = None,
        target: object = None,
        generate: object = 0,
    ) -> dict[str, object]:
        """Tokens and page data of one text (see ``describe`` for what each model takes);
        values of the wrong type or length are refused with an ``AttnScopeError``."""
        self._check(text, text_pair, target, generate)
        assert isinstance(text, str) and isinstance(generate, int)  # _check made sure
        assert text_pair is None or isinstance(text_pair, str)
        assert target is None or isinstance(target, str)
        with self._lock:
            maps, generated = self._captured(text, text_pair, target, generate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a view's "last call" warning is said in the note
            data = page_data(maps)
            data["table"] = stats_table(head_stats(maps))
        data["title"] = f"{self.name}: {text[:60]}" + ("…" if len(text) > 60 else "")
        # one object: what the page draws (maps, labels, note, statistics) and the tokens
        data.update(
            model=self.name,
            tokens=_first(maps.tokens),
            target_tokens=_first(maps.target_tokens),
            generated=generated,
        )
        return data

    def _check(self, text: object, pair: object, target: object, generate: object) -> None:
        if not isinstance(text, str) or not text.strip():
            raise AttnScopeError('"text" must be a non-empty string')
        for field, value in (("text", text), ("text_pair", pair), ("target", target)):
            if value is not None and not isinstance(value, str):
                raise AttnScopeError(f'"{field}" must be a string, got {type(value).__name__}')
            if isinstance(value, str) and len(value) > MAX_CHARS:
                raise LengthError(
                    f'"{field}" is {len(value)} characters long; the limit is {MAX_CHARS} '
                    f"characters (and {self.max_tokens} tokens)"
                )
        if target is not None and not self.encoder_decoder:
            raise AttnScopeError(f'"target" is decoder text; {self.name} is not an encoder-decoder')
        if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
            raise AttnScopeError(f'"generate" must be a whole number of tokens, got {generate!r}')
        if generate and not self.causal:
            raise AttnScopeError(f'"generate" needs a causal language model; {self.name} is not')
        if generate > MAX_NEW_TOKENS:
            raise LengthError(f'"generate" is {generate}; the limit is {MAX_NEW_TOKENS} tokens')

    def _captured(
        self, text: str, pair: str | None, target: str | None, generate: int
    ) -> tuple[AttentionMaps, list[str]]:
        encoded = _tokenize(self.tokenizer, [text], None if pair is None else [pair])
        ids = encoded["input_ids"]
        self._check_tokens("text" if pair is None else "text and text_pair", ids.size(1) + generate)
        inputs: dict[str, Any] = dict(encoded)
        target_ids = None
        if self.encoder_decoder:
            if target:
                target_ids = _tokenize(self.tokenizer, [target], None)["input_ids"]
                self._check_tokens("target", target_ids.size(1))
            else:
                start = self.model.config.decoder_start_token_id
                target_ids = torch.full((1, 1), int(start if start is not None else 0))
            inputs["decoder_input_ids"] = target_ids
        generated: list[str] = []
        with torch.no_grad(), capture(self.model, lazy=not generate, norms=True) as attn:
            if generate:
                pad = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
                out = self.model.generate(
                    **inputs, max_new_tokens=generate, do_sample=False, pad_token_id=pad
                )
            else:
                self.model(**inputs)
        if generate:
            new = out[0, ids.size(1) :].tolist()
            generated = [str(t) for t in self.tokenizer.convert_ids_to_tokens(new)]
            seen = attn._shape(attn.names[0])[2]  # the last new token is never fed back
            ids = out[:, :seen]
        return attn.with_tokenizer(self.tokenizer, ids, target_ids), generated

    def _check_tokens(self, what: str, length: int) -> None:
        if length > self.max_tokens:
            raise LengthError(
                f"the {what} is {length} tokens long; this server takes at most "
                f"{self.max_tokens} tokens: shorten it"
            )


def _limit(tokenizer: Any, model: Any, asked: int | None) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), asked]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10**6:
        limits.append(model_max)
    found = [x for x in limits if isinstance(x, int) and x > 0]
    return min(found) if found else 1024


def _first(tokens: list[str] | list[list[str]] | None) -> list[str] | None:
    """The labels of the one batch item the explorer captures."""
    if tokens and isinstance(tokens[0], list):
        return [str(t) for t in tokens[0]]
    return tokens  # type: ignore[return-value]
