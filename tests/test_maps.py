"""AttentionMaps: selection, stacking, labels, and save/load in safetensors."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.serialization import read_safetensors, write_safetensors
from models import sequence, transformer


@pytest.fixture
def captured() -> AttentionMaps:
    model = transformer().eval()
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(
            sequence(2, 5),
            sequence(2, 3, seed=2),
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(3),
        )
    return attn


def test_select_stack_to_nbytes(captured: AttentionMaps) -> None:
    cross = captured.select(kind="cross")
    assert cross.names == ["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]
    stacked = cross.stack()
    assert stacked.shape == (2, 2, 4, 3, 5)
    assert torch.equal(stacked[1], captured["decoder.layers.1.multihead_attn"])
    assert captured.select(include="encoder.*").names == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
    ]
    with pytest.raises(AttnScopeError, match=r"different shapes.*select"):
        captured.stack()
    with pytest.raises(AttnScopeError, match="kind must be one of"):
        captured.select(kind="global")
    half = captured.to(dtype=torch.float16)
    assert half.nbytes * 2 == captured.nbytes == sum(w.numel() * 4 for _, w in captured.items())


def test_labels_follow_kinds(captured: AttentionMaps) -> None:
    src = ["a", "b", "c", "d", "e"]
    tgt = [["<s>", "x", "y"], ["<s>", "p", "q"]]
    labelled = captured.with_tokens(src, tgt)
    assert labelled.labels("encoder.layers.0.self_attn") == (src, src)
    assert labelled.labels("decoder.layers.0.self_attn", batch=1) == (tgt[1], tgt[1])
    assert labelled.labels("decoder.layers.0.multihead_attn") == (tgt[0], src)
    assert captured.tokens is None
    with pytest.raises(AttnScopeError, match="has 5 query positions but its labels have 4"):
        captured.with_tokens(src[:4])


def test_save_load_round_trip(tmp_path: Path, captured: AttentionMaps) -> None:
    extra = captured.with_tokens(["a", "b", "c", "d", "e"], ["<s>", "x", "y"])
    extra._append("again", "causal", torch.rand(1, 2, 2, 2).to(torch.bfloat16))
    extra._append("again", "causal", torch.rand(1, 2, 1, 3).to(torch.bfloat16))
    path = extra.save(tmp_path / "cap.safetensors")
    loaded = attnscope.load(path)
    assert loaded.names == extra.names
    assert loaded.tokens == extra.tokens and loaded.target_tokens == extra.target_tokens
    for name in extra.names:
        assert loaded.kind(name) == extra.kind(name)
        for a, b in zip(loaded.calls(name), extra.calls(name), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["cap.safetensors"]


def test_files_interchange_with_the_safetensors_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": torch.randn(2, 3),
        "b": torch.arange(6, dtype=torch.int64).reshape(3, 2),
        "c": torch.randn(4).to(torch.bfloat16),
        "d": torch.ones(2, 2, dtype=torch.bool),
    }
    ours = write_safetensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    for key, value in st.load_file(ours).items():
        assert torch.equal(value, tensors[key])
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(tensors, theirs, metadata={"k": "v"})
    read, metadata = read_safetensors(theirs)
    assert metadata == {"k": "v"}
    for key, value in read.items():
        assert torch.equal(value, tensors[key])
    with pytest.raises(AttnScopeError, match="not an attnscope capture"):
        attnscope.load(theirs)


def test_damaged_files_raise_naming_file_and_problem(
    tmp_path: Path, captured: AttentionMaps
) -> None:
    good = captured.save(tmp_path / "good.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) - 10])
    with pytest.raises(AttnScopeError, match=r"truncated\.safetensors: .*(past the end|truncated)"):
        attnscope.load(truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(AttnScopeError, match="too short"):
        attnscope.load(tiny)
    pickled = tmp_path / "evil.safetensors"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(AttnScopeError, match=r"evil\.safetensors"):
        attnscope.load(pickled)
    with pytest.raises(AttnScopeError, match="no such file"):
        attnscope.load(tmp_path / "missing.safetensors")


def test_newer_format_asks_for_an_upgrade(tmp_path: Path, captured: AttentionMaps) -> None:
    path = captured.save(tmp_path / "cap.safetensors")
    tensors, metadata = read_safetensors(path)
    header = json.loads(metadata["attnscope"])
    header["format_version"] = 99
    write_safetensors(path, tensors, {"attnscope": json.dumps(header)})
    with pytest.raises(AttnScopeError, match=r"format 99.*upgrade attnscope"):
        attnscope.load(path)


def test_failed_save_leaves_the_old_file_and_no_temp(
    tmp_path: Path, captured: AttentionMaps, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cap.safetensors"
    target.write_bytes(b"old content")

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        captured.save(target)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["cap.safetensors"]


def test_from_tensors_and_concat() -> None:
    maps = AttentionMaps.from_tensors(
        {"enc": torch.rand(1, 2, 3, 3), "dec": [torch.rand(1, 2, 2, 2), torch.rand(1, 2, 1, 3)]},
        kinds={"enc": "self", "dec": "causal"},
    )
    joined = maps.concat("dec")
    assert joined.shape == (1, 2, 3, 3)
    assert torch.all(joined[:, :, :2, 2] == 0)
    with pytest.raises(AttnScopeError, match="no kind given"):
        AttentionMaps.from_tensors({"x": torch.rand(1, 1, 2, 2)}, kinds={})
    with pytest.raises(AttnScopeError, match=r"\(batch, heads, query, key\)"):
        AttentionMaps.from_tensors({"x": torch.rand(2, 2)})


def _calls(*shapes: tuple[int, int]) -> list[torch.Tensor]:
    return [torch.softmax(torch.randn(1, 2, q, k), -1) for q, k in shapes]


@pytest.mark.parametrize(
    ("kind", "shapes", "incremental"),
    [
        ("causal", [(3, 3), (1, 4), (1, 5)], True),  # prefill, then one query per step
        ("causal", [(1, 1), (2, 3)], True),  # a chunk of two new queries
        ("causal", [(1, 1), (2, 2), (3, 3)], False),  # the whole prefix re-run each step
        ("self", [(4, 4), (4, 4)], False),  # one module on two inputs (or shared weights)
        ("cross", [(3, 7), (1, 7), (1, 7)], True),  # encoder keys, new queries
        ("cross", [(1, 7), (2, 7), (3, 7)], False),  # the prefix re-run against the encoder
        ("cross", [(1, 1), (1, 2)], True),  # a cached nn.MultiheadAttention counts as cross
        ("cross", [(2, 7), (1, 5)], False),  # neither the same keys nor a cache
    ],
)
def test_incremental_calls_by_their_shapes(
    kind: str, shapes: list[tuple[int, int]], incremental: bool
) -> None:
    maps = AttentionMaps.from_tensors({"m": _calls(*shapes)}, kinds=kind)
    assert maps.incremental("m") is incremental
    if incremental:
        joined = maps.concat("m")
        assert joined.shape[2:] == (sum(q for q, _ in shapes), max(k for _, k in shapes))
        weights, note = maps.display("m")
        assert torch.equal(weights, joined) and note == f"{len(shapes)} incremental calls joined"
    else:
        with pytest.raises(AttnScopeError, match=r"not incremental.*attn\.calls\('m'\)\[-1\]"):
            maps.concat("m")
        with pytest.warns(UserWarning, match=r"showing the last call, attn\.calls\('m'\)\[-1\]"):
            weights, note = maps.display("m")
        assert torch.equal(weights, maps.calls("m")[-1])
        assert note == f"last of {len(shapes)} calls"


def test_concat_by_hand_and_display_of_one_call() -> None:
    first = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    step = torch.tensor([[[[0.2, 0.3, 0.5]]]])
    maps = AttentionMaps.from_tensors({"d": [first, step], "e": first}, kinds="causal")
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.2, 0.3, 0.5]])
    assert torch.equal(maps.concat("d")[0, 0], expected)
    weights, note = maps.display("e")
    assert torch.equal(weights, first) and note == ""
    assert maps.labels("d") == (None, None)
    labelled = maps.select(include="d").with_tokens(["a", "b", "c"])  # fit the joined map
    assert labelled.labels("d") == (["a", "b", "c"], ["a", "b", "c"])


def test_header_is_plain_json(tmp_path: Path, captured: AttentionMaps) -> None:
    raw = captured.save(tmp_path / "c.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["attnscope"])
    assert meta["format"] == "attnscope.maps" and meta["attnscope_version"] == attnscope.__version__
    assert meta["kinds"]["decoder.layers.0.multihead_attn"] == "cross"
