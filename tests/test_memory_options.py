"""rows=, lazy=True and spill=DIR give the same weights as a full capture, holding less."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import attnscope
from attnscope import AttnScopeError, pool
from models import MODES, encoder, mode, padding, sequence, transformer


def full_and(model: nn.Module, run, **options):
    with torch.no_grad(), attnscope.capture(model) as full:
        run()
    with torch.no_grad(), attnscope.capture(model, **options) as other:
        run()
    return full, other


def test_rows_select_query_positions_for_mha_and_fused_paths() -> None:
    model = encoder().eval()
    x, pad = sequence(3, 6), padding([6, 4, 5], 6)
    full, some = full_and(model, lambda: model(x, src_key_padding_mask=pad), rows=[0, -1])
    for name in full.names:
        assert some[name].shape == (3, 4, 2, 6)
        torch.testing.assert_close(some[name], full[name][:, :, [0, 5]], atol=1e-6, rtol=0)
        assert some.rows(name) == [0, -1]
    model.train()  # slow path, with the causal hint
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    full, some = full_and(model, lambda: model(x, mask=causal, is_causal=True), rows=[2])
    for name in full.names:
        torch.testing.assert_close(some[name], full[name][:, :, [2]], atol=1e-6, rtol=0)


def test_rows_on_hf_sdpa_and_labels_follow() -> None:
    pytest.importorskip("transformers")
    from hf_models import build

    family = build("llama")
    full, last = full_and(family.model, lambda: family.model(**family.inputs), rows=[-1])
    for name in full.names:
        torch.testing.assert_close(last[name], full[name][:, :, [-1]], atol=1e-6, rtol=0)
    tokens = [f"t{i}" for i in range(9)]
    labelled = last.with_tokens(tokens)
    assert labelled.labels(last.names[0]) == (["t8"], tokens)


def test_rows_outside_the_sequence_is_a_clear_error() -> None:
    model = encoder().eval()
    with (
        pytest.raises(AttnScopeError, match=r"rows=\[6\].*6 query positions"),
        torch.no_grad(),
        attnscope.capture(model, rows=[6]),
    ):
        model(sequence(1, 6))
    with (
        pytest.raises(AttnScopeError, match="non-empty list of query positions"),
        attnscope.capture(model, rows=[]),
    ):
        pass


@pytest.mark.parametrize("which", ["encoder", "transformer", "hf"])
def test_lazy_equals_eager_and_holds_less(which: str) -> None:
    if which == "encoder":
        model = encoder().eval()
        x, pad = sequence(2, 64), padding([64, 50], 64)

        def run() -> None:
            model(x, src_key_padding_mask=pad)
    elif which == "transformer":
        model = transformer().eval()
        src, tgt = sequence(2, 40), sequence(2, 30, seed=3)

        def run() -> None:
            model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(30))
    else:
        pytest.importorskip("transformers")
        from hf_models import build

        family = build("bart")
        model = family.model

        def run() -> None:
            model(**family.inputs)

    full, lazy = full_and(model, run, lazy=True)
    assert lazy.lazy
    assert lazy.names == full.names
    for name in full.names:
        assert lazy.kind(name) == full.kind(name)
        torch.testing.assert_close(lazy[name], full[name], atol=1e-6, rtol=0)
    if which != "hf":
        assert lazy.nbytes < full.nbytes


# batch x length up to 2(D+1) = 18 keeps the kernel's q and k, above it the input
@pytest.mark.parametrize("length", [5, 7])
def test_lazy_mha_keeps_its_own_copies_of_input_masks_and_projection(length: int) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, length, 8)
    pad = torch.zeros(3, length, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad(), attnscope.capture(mha) as eager:
        mha(x, x, x, key_padding_mask=pad, need_weights=False)
    with torch.no_grad(), attnscope.capture(mha, lazy=True) as lazy:
        mha(x, x, x, key_padding_mask=pad, need_weights=False)
    with torch.no_grad():
        mha.in_proj_weight.mul_(3.0)  # an optimizer step after the capture
    x.add_(1.0)  # the caller reuses its buffers
    pad.fill_(False)
    torch.testing.assert_close(lazy[""], eager[""], atol=1e-6, rtol=0)
    assert eager[""][1, :, :, 3:].abs().max() == 0  # the padding the call saw


def test_lazy_keeps_a_broadcast_mask_as_one_copy() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    batch, length = 6, 40  # above 2(D+1) rows: the input and projection are held
    x = torch.randn(batch, length, 8)
    hidden = torch.rand(length, length) < 0.3
    hidden.fill_diagonal_(False)
    mask = hidden.expand(batch * 2, length, length)  # one mask for every row and head
    with torch.no_grad(), attnscope.capture(mha) as eager:
        mha(x, x, x, attn_mask=mask, need_weights=False)
    with torch.no_grad(), attnscope.capture(mha, lazy=True) as lazy:
        mha(x, x, x, attn_mask=mask, need_weights=False)
    was_hidden = hidden.clone()
    hidden.fill_(False)  # the caller's mask changes after the forward
    torch.testing.assert_close(lazy[""], eager[""], atol=1e-6, rtol=0)
    assert float(lazy[""][:, :, was_hidden].abs().max()) == 0.0
    # input, q and k projections with their biases, and the mask once: not batch x heads x L²
    assert lazy.nbytes == x.nbytes + (2 * 8 * 8 + 2 * 8) * 4 + length * length


@pytest.mark.parametrize("run_mode", MODES)
def test_lazy_equals_eager_in_every_mode_and_reuses_its_memory_across_them(run_mode: str) -> None:
    model = encoder(layers=2)
    # batch x length 2 x 5 keeps the kernel's q and k on the fused path, 4 x 40 the input
    inputs = [sequence(2, 5), sequence(4, 40, seed=2)]
    for x in inputs:
        with mode(model, run_mode), attnscope.capture(model) as eager:
            model(x)
        with mode(model, run_mode), attnscope.capture(model, lazy=True) as lazy:
            model(x)
        for name in eager.names:
            torch.testing.assert_close(lazy[name], eager[name], atol=1e-6, rtol=0)
        del lazy  # its memory goes back to the pool, to be written by the next capture
        gc.collect()
        with torch.no_grad(), attnscope.capture(model.eval(), lazy=True) as again:
            model(x)
        with torch.no_grad(), attnscope.capture(model) as reference:
            model(x)
        for name in reference.names:
            torch.testing.assert_close(again[name], reference[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_lazy_holds_a_mask_every_layer_shares_once(fused: bool) -> None:
    torch.manual_seed(0)
    batch, length, width, heads, layers = 2, 128, 32, 4, 6
    layer = nn.TransformerEncoderLayer(width, heads, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    x = torch.randn(batch, length, width)
    mask = torch.rand(batch * heads, length, length) < 0.5  # True hides the key
    mask[:, range(length), range(length)] = False
    context = torch.no_grad if fused else contextlib.nullcontext  # grad on: the slow path
    with context(), attnscope.capture(model) as eager:
        model(x, mask=mask)
    with context(), attnscope.capture(model, lazy=True) as lazy:
        model(x, mask=mask)
    for name in eager.names:
        torch.testing.assert_close(lazy[name], eager[name], atol=1e-6, rtol=0)
    # per layer its input and its q/k projection (above 2(D+1) rows), and the mask once: as
    # the fused kernel reads it (bool), or as the encoder hands it to every layer (float)
    per_layer = batch * length * width * 4 + (2 * width * width + 2 * width) * 4
    mask_bytes = mask.numel() * (1 if fused else 4)
    assert lazy.nbytes == layers * per_layer + mask_bytes


@pytest.mark.parametrize("which", ["mha", "encoder"])
def test_lazy_sees_a_mask_rewritten_between_calls_even_through_data(which: str) -> None:
    """``.data`` writes move no version counter: a copy of the mask is only shared within one
    encoder forward, never between calls."""
    torch.manual_seed(0)
    if which == "mha":
        module: nn.Module = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    else:
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 8)

    def run() -> None:
        mask = torch.zeros(5, 5)
        for i in range(3):
            if i:
                mask.data[:, i] = float("-inf")
            if which == "mha":
                module(x, x, x, attn_mask=mask)
            else:
                module(x, mask=mask)

    with torch.no_grad(), attnscope.capture(module) as eager:
        run()
    with torch.no_grad(), attnscope.capture(module, lazy=True) as lazy:
        run()
    for name in eager.names:
        for got, expected in zip(lazy.calls(name), eager.calls(name), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


class _PackedAttention(nn.Module):
    """q, k and v cut from one projection, as GPT-2 does."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        packed = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v)


def test_lazy_nbytes_counts_views_of_one_buffer_once() -> None:
    torch.manual_seed(0)
    attention = _PackedAttention(32, 4).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad(), attnscope.capture(attention, lazy=True) as lazy:
        attention(x)
    packed_bytes = 2 * 16 * 3 * 32 * 4  # q and k interleave with v in it
    assert 2 * 16 * 2 * 32 * 4 <= lazy.nbytes <= packed_bytes


class _CachedAttention(nn.Module):
    """Keys written in place into a cache allocated at the first call (a static KV cache)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.heads = heads
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        if self.cache is None:
            self.cache = torch.zeros(shape).transpose(1, 2)
        q = self.q(x).view(shape).transpose(1, 2)
        self.cache.copy_(self.k(x).view(shape).transpose(1, 2))
        return F.scaled_dot_product_attention(q, self.cache, self.cache)


def test_lazy_under_inference_mode_is_not_fooled_by_a_cache_written_in_place() -> None:
    torch.manual_seed(0)
    attention = _CachedAttention(8, 2).eval()
    first, second = torch.randn(2, 1, 5, 8)
    with torch.inference_mode(), attnscope.capture(attention) as eager:
        attention(first)
        attention(second)
    attention.cache = None
    with torch.inference_mode(), attnscope.capture(attention, lazy=True) as lazy:
        attention(first)
        attention(second)  # overwrites the keys the first call attended to
    for got, expected in zip(lazy.calls(""), eager.calls(""), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


class _Attention(nn.Module):
    """Attention over tensors the caller owns (a static KV cache, say)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_lazy_refuses_a_held_tensor_changed_in_place() -> None:
    q, k, v = torch.randn(3, 1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    attention = _Attention()
    with torch.no_grad(), attnscope.capture(attention, lazy=True) as lazy:
        attention(q, k, v)
    torch.testing.assert_close(lazy[""], torch.softmax(q @ k.mT / 8**0.5, -1), atol=1e-6, rtol=0)
    k.add_(1.0)  # the cache is written after the forward
    with pytest.raises(AttnScopeError, match=r"changed in place.*lazy=False"):
        lazy[""]


class _SeparateProjections(nn.Module):
    """q, k and v from projections of their own (BERT's layout), and a record of the values
    and output of its last sdpa call, weakly held."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.heads = heads
        self.seen: list[weakref.ref[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
        output = F.scaled_dot_product_attention(q, k, v)
        self.seen = [weakref.ref(t) for t in (q, k, v, output)]
        return output.transpose(1, 2).reshape(batch, length, width)


@pytest.mark.parametrize("options", [{}, {"norms": {"": "q"}}])
def test_lazy_keeps_queries_and_keys_and_lets_values_and_output_go(options: dict) -> None:
    """A lazy capture needs q and k (and the mask) for the weights; it must not keep the
    values and the kernel's output alive as well, twice the memory it says it holds, unless
    the capture asked for norms (read from the values as the forward runs)."""
    torch.manual_seed(0)
    attention = _SeparateProjections(16, 4).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), attnscope.capture(attention, lazy=True, **options) as lazy:
        attention(x)
    gc.collect()
    q, k, v, output = (ref() for ref in attention.seen)
    assert q is not None and k is not None, "the weights' own terms were let go"
    assert v is None and output is None, "the values or the output are still held"
    q_heads = attention.q(x).view(2, 5, 4, 4).transpose(1, 2)
    k_heads = attention.k(x).view(2, 5, 4, 4).transpose(1, 2)
    expected = torch.softmax(q_heads @ k_heads.mT / 2.0, -1)
    torch.testing.assert_close(lazy[""], expected, atol=1e-6, rtol=0)


def test_lazy_heads_dtype_and_save(tmp_path: Path) -> None:
    model = encoder().eval()
    x = sequence(2, 7)
    full, lazy = full_and(model, lambda: model(x), lazy=True, heads=[1], dtype=torch.float16)
    for name in full.names:
        assert lazy[name].dtype == torch.float16
        torch.testing.assert_close(lazy[name].float(), full[name][:, [1]], atol=1e-3, rtol=0)
    loaded = attnscope.load(lazy.save(tmp_path / "lazy.safetensors"))
    assert not loaded.lazy
    assert torch.equal(loaded[full.names[0]], lazy[full.names[0]])


def test_spill_writes_each_call_and_maps_it_back(tmp_path: Path) -> None:
    model = transformer().eval()
    src, tgt = sequence(2, 12), sequence(2, 9, seed=3)
    folder = tmp_path / "spill"
    full, spilled = full_and(model, lambda: model(src, tgt), spill=folder)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:05d}.safetensors" for i in range(6)] + ["index.json"]
    assert spilled.names == full.names
    for name in full.names:
        assert torch.equal(spilled[name], full[name])
    assert spilled.nbytes == full.nbytes  # what the maps describe; memory is the page cache
    reloaded = attnscope.load(folder)
    for name in full.names:
        assert torch.equal(reloaded[name], full[name])
        assert reloaded.kind(name) == full.kind(name)
    with (
        pytest.raises(AttnScopeError, match="already holds a spilled capture"),
        attnscope.capture(model, spill=folder),
    ):
        pass


def test_spill_errors_leave_complete_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = transformer().eval()
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    with (
        pytest.raises(AttnScopeError, match="cannot write there"),
        attnscope.capture(model, spill=blocked),
    ):
        pass
    if os.geteuid() != 0:  # root writes anywhere; the chmod case only means something for users
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o500)
        with (
            pytest.raises(AttnScopeError, match="cannot write there"),
            attnscope.capture(model, spill=readonly),
        ):
            pass
    folder = tmp_path / "full"
    calls = {"n": 0}
    import attnscope.spill as spill_module

    original = spill_module.write_safetensors

    def disk_fills_up(path, tensors, metadata):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(path, tensors, metadata)

    monkeypatch.setattr(spill_module, "write_safetensors", disk_fills_up)
    with (
        pytest.raises(AttnScopeError, match=r"No space left.*2 calls before it are complete"),
        torch.no_grad(),
        attnscope.capture(model, spill=folder),
    ):
        model(sequence(1, 5), sequence(1, 4, seed=2))
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.safetensors",
        "00001.safetensors",
        "index.json",
    ]
    assert len(attnscope.load(folder).names) == 2


def test_lazy_and_spill_exclude_each_other(tmp_path: Path) -> None:
    with (
        pytest.raises(AttnScopeError, match="choose one"),
        attnscope.capture(encoder(), lazy=True, spill=tmp_path / "s"),
    ):
        pass


def test_memory_mapped_file_load(tmp_path: Path) -> None:
    maps = attnscope.AttentionMaps.from_tensors({"a": torch.rand(2, 3, 4, 4)})
    path = maps.save(tmp_path / "m.safetensors")
    mapped = attnscope.load(path, memory_map=True)
    assert torch.equal(mapped["a"], maps["a"])
    path.unlink()  # the mapping keeps the data readable, as a mapped file does
    gc.collect()
    assert torch.equal(mapped["a"], maps["a"])


class _GrowingCache(nn.Module):
    """Decoding with keys and values cached by concatenation (transformers' DynamicCache):
    each call's keys are a new tensor, the last call's plus its own positions. ``reorder``
    permutes the cached batch before the next call, as beam search does."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.heads = heads
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.reorder: torch.Tensor | None = None
        self.seen: list[weakref.ref[torch.Tensor]] = []

    def split(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, width = t.shape
        return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(p(x)) for p in (self.q, self.k, self.v))
        if self.keys is not None and self.values is not None and self.reorder is not None:
            self.keys, self.values = self.keys[self.reorder], self.values[self.reorder]
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        self.seen.append(weakref.ref(self.keys))
        causal = x.size(1) > 1  # the prompt; a step's one query sees every cached key
        return F.scaled_dot_product_attention(q, self.keys, self.values, is_causal=causal)


def _decode(model: _GrowingCache, steps: int, batch: int = 1) -> list[torch.Tensor]:
    """A 4-position prompt, then ``steps`` one-position steps; the inputs of each call."""
    inputs = [torch.randn(batch, 4, 8)] + [torch.randn(batch, 1, 8) for _ in range(steps)]
    for x in inputs:
        model(x)
    return inputs


def _by_hand(model: _GrowingCache, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each call's weights, softmax(q kᵀ / √d) over the keys so far, from the inputs."""
    expected, seen = [], []
    for x in inputs:
        seen.append(x)
        q, k = model.split(model.q(x)), model.split(model.k(torch.cat(seen, 1)))
        scores = q @ k.mT / 2.0  # head dim 4
        if x.size(1) > 1:
            scores = scores.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), -torch.inf)
        expected.append(torch.softmax(scores, -1))
    return expected


def test_lazy_generation_holds_one_key_cache_not_one_per_step() -> None:
    """Each decoding step's keys are the last step's plus one position: a lazy capture that
    kept every step's keys held O(L²) (GPT-2 small, 128 new tokens: 364 MB, against 6 MB of
    maps in a full capture). It keeps the newest cache and reads earlier steps' keys as its
    first positions, with the same weights, and counts what it holds that way."""
    torch.manual_seed(0)
    model = _GrowingCache(8, 2).eval()
    with torch.no_grad(), attnscope.capture(model, lazy=True, max_bytes=1000) as lazy:
        inputs = _decode(model, steps=6)
    gc.collect()
    alive = [ref() is not None for ref in model.seen]
    assert alive == [False] * 6 + [True], "an earlier step's keys are still held"
    # the newest keys (10 positions) and every call's queries (10 positions), 1 x 8 floats
    assert lazy.nbytes == (10 + 10) * 8 * 4
    calls = lazy.calls("")
    assert [tuple(c.shape) for c in calls] == [(1, 2, 4, 4)] + [(1, 2, 1, n) for n in range(5, 11)]
    for got, expected in zip(calls, _by_hand(model, inputs), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    q, k = lazy.queries_keys("", 2)  # the third call: 6 keys, the first 6 of the newest
    assert model.keys is not None
    torch.testing.assert_close(k, model.keys[:, :, :6], atol=0, rtol=0)
    torch.testing.assert_close(q, model.split(model.q(inputs[2])) / 2.0, atol=1e-6, rtol=0)
    model.keys.add_(1.0)  # the newest cache, read by every step, written after the capture
    with pytest.raises(AttnScopeError, match=r"changed in place.*lazy=False"):
        lazy.calls("")[1]


def test_a_deep_copy_of_a_lazy_capture_reads_and_guards_the_same_tensors() -> None:
    """``copy.deepcopy`` of a lazy capture reads the tensors the original holds: copies of
    them would start new version counters (a copy read nothing at all: each raised "changed
    in place"), and an adapter's closure (the fused encoder's here) would still read the
    originals, unguarded. So the copy's weights are the original's, and a change to what
    they hold refuses in both, never silently other weights."""
    torch.manual_seed(0)
    model = _GrowingCache(8, 2).eval()
    with torch.no_grad(), attnscope.capture(model, lazy=True) as lazy:
        inputs = _decode(model, steps=4)
    copied = copy.deepcopy(lazy)
    for got, reference in zip(copied.calls(""), _by_hand(model, inputs), strict=True):
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)
    assert copied.nbytes == lazy.nbytes
    layers = encoder().eval()
    x = sequence(2, 7)
    with torch.no_grad(), attnscope.capture(layers, lazy=True) as native:
        layers(x)
    twin = copy.deepcopy(native)
    for name in native.names:
        assert torch.equal(twin[name], native[name])
    assert model.keys is not None
    model.keys.add_(1.0)  # the newest cache, which every call reads
    native.queries_keys(native.names[0])[0].add_(1.0)  # the copy of q the capture made
    for maps in (lazy, copied):
        with pytest.raises(AttnScopeError, match="changed in place"):
            maps.calls("")
    for maps in (native, twin):
        with pytest.raises(AttnScopeError, match="changed in place"):
            maps[native.names[0]]


def test_lazy_generation_under_inference_mode_shares_its_copies_of_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``inference_mode`` a held tensor has no version counter, so the capture keeps
    copies of the keys (pooled: ``SMALL`` lowered so these are): only the newest copy stays,
    read for every step. A step's key copy once shared one block with its query copy, which
    kept every step's keys in memory while ``nbytes`` counted one cache."""
    monkeypatch.setattr(pool, "SMALL", 0)
    torch.manual_seed(0)
    model = _GrowingCache(8, 2).eval()
    with torch.inference_mode(), attnscope.capture(model, lazy=True) as lazy:
        inputs = _decode(model, steps=6)
    assert lazy.nbytes == (10 + 10) * 8 * 4  # one copy of the newest keys, the queries
    with torch.inference_mode():
        expected = _by_hand(model, inputs)
    for got, reference in zip(lazy.calls(""), expected, strict=True):
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)
    gc.collect()
    free = pool.free_bytes()
    del lazy, got
    gc.collect()
    held = pool.free_bytes() - free  # the blocks the capture held, back in the pool now
    assert 0 < held <= (10 + 10) * 8 * 4 + 7 * pool.ALIGN  # every step's keys: 1568 more


class _PackedCache(_GrowingCache):
    """``_GrowingCache`` with q, k and v cut from one packed projection (GPT-2's layout): the
    prompt's keys are a view of the buffer its queries also read."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__(width, heads)
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(t) for t in self.qkv(x).split(x.size(-1), -1))
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        return F.scaled_dot_product_attention(q, self.keys, self.values, is_causal=x.size(1) > 1)


def test_lazy_generation_max_bytes_counts_what_is_still_held() -> None:
    """Letting the prompt's keys go frees nothing while its queries read the same buffer:
    ``max_bytes`` counts what the capture holds (here exactly ``nbytes``), never less."""
    torch.manual_seed(0)
    model = _PackedCache(64, 4).eval()
    inputs = [torch.randn(1, 32, 64)] + [torch.randn(1, 1, 64) for _ in range(4)]

    def run(**options: int) -> attnscope.AttentionMaps:
        model.keys = model.values = None
        with torch.no_grad(), attnscope.capture(model, lazy=True, **options) as lazy:
            for x in inputs:
                model(x)
        return lazy

    held = run().nbytes
    assert run(max_bytes=held).nbytes == held
    prompt = 32 * 3 * 64 * 4  # the prompt call holds about its packed buffer
    assert prompt < held * 3 // 4
    with pytest.raises(AttnScopeError, match="capture refused before allocating"):
        run(max_bytes=held * 3 // 4)  # it counted 10,496 when it took the span as let go


def test_lazy_generation_shares_nothing_with_a_cache_reordered_between_steps() -> None:
    """Beam search reorders the cached batch between steps: the new keys no longer begin with
    the old ones, so each step keeps its own, and the weights stay exact."""
    torch.manual_seed(0)
    model = _GrowingCache(8, 2).eval()
    model.reorder = torch.tensor([1, 0])
    with torch.no_grad(), attnscope.capture(model, lazy=True) as lazy:
        inputs = _decode(model, steps=3, batch=2)
    gc.collect()
    assert all(ref() is not None for ref in model.seen)
    reordered = []
    for got, x in zip(lazy.calls(""), inputs, strict=True):
        reordered = [r[[1, 0]] for r in reordered] + [x]
        q, k = model.split(model.q(x)), model.split(model.k(torch.cat(reordered, 1)))
        scores = q @ k.mT / 2.0
        if x.size(1) > 1:
            scores = scores.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), -torch.inf)
        torch.testing.assert_close(got, torch.softmax(scores, -1), atol=1e-6, rtol=0)
