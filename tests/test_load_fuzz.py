"""Fuzzed loading: hundreds of mutated captures (flipped bytes anywhere, changed header fields,
truncations, appended garbage), as single files read or mapped and as spill folders. ``load``
either raises ``AttnScopeError`` or returns maps whose every part agrees with the rest."""

from __future__ import annotations

import faulthandler
import json
import random
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from models import sequence, transformer

SEED = 20240612
CASES_PER_TARGET = 150
# far above the few milliseconds one load takes; it only turns a hang into a failure
WATCHDOG_SECONDS = 120
NASTY_VALUES: list[object] = [
    None,
    True,
    -1,
    0,
    7,
    2**31,
    2**64,
    -(2**63),
    1.5,
    1e308,
    "",
    "x",
    "F32",
    "self",
    [],
    [0],
    [-1, 2],
    [2**62, 2**62, 0],
    ["a", "b"],
    [[]],
    {},
    {"a": 1},
]


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Dump every thread's stack and exit if the block hangs, rather than block the run."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def labelled_capture() -> AttentionMaps:
    """Every field of the file format in use: kinds, several calls, rows, both label sets."""
    torch.manual_seed(0)
    maps = AttentionMaps.from_tensors(
        {
            "enc": torch.softmax(torch.randn(2, 2, 3, 3), -1),
            "dec": [
                torch.softmax(torch.randn(2, 2, 2, 2), -1).to(torch.bfloat16),
                torch.softmax(torch.randn(2, 2, 1, 3), -1).to(torch.bfloat16),
            ],
            "cross": torch.softmax(torch.randn(2, 1, 3, 3), -1).half(),
        },
        kinds={"enc": "self", "dec": "causal", "cross": "cross"},
    )
    maps._append("last", "self", torch.softmax(torch.randn(2, 2, 1, 3), -1), rows=[-1])
    return maps.with_tokens([["a", "b", "c"], ["d", "e", "f"]], ["<s>", "x", "y"])


def spilled_capture(folder: Path) -> Path:
    model = transformer().eval()
    with torch.no_grad(), attnscope.capture(model, spill=folder):
        model(sequence(1, 3), sequence(1, 2, seed=2))
    return folder


def assert_self_consistent(maps: AttentionMaps) -> None:
    """What views and analyses rely on: every name has a kind, 4-D float calls that can be
    read, and labels of the right length for every batch item."""
    for name in maps.names:
        assert maps.kind(name) in ("self", "causal", "cross")
        calls = maps.calls(name)
        for weights in calls:
            assert weights.dim() == 4 and weights.is_floating_point()
            weights.float().sum()  # touch every byte: a mapped file must be readable
        rows = maps.rows(name)
        queries = sum(w.size(2) for w in calls) if rows is None else len(rows)
        keys = max(w.size(3) for w in calls)
        for item in range(calls[0].size(0)):
            query_labels, key_labels = maps.labels(name, item)
            assert query_labels is None or len(query_labels) == queries
            assert key_labels is None or len(key_labels) <= keys


def try_load(path: Path, memory_map: bool) -> str:
    """``"loaded"`` or ``"refused"``; anything else fails the test with the case's input."""
    try:
        maps = attnscope.load(path, memory_map=memory_map)
    except AttnScopeError:
        return "refused"
    assert_self_consistent(maps)
    return "loaded"


# -- mutations ----------------------------------------------------------------------------


def flip_bits(data: bytes, rng: random.Random, begin: int = 0, end: int | None = None) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(begin, min(end or len(out), len(out)))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def header_end(data: bytes) -> int:
    return 8 + int(struct.unpack("<Q", data[:8])[0])


def random_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def append_garbage(data: bytes, rng: random.Random) -> bytes:
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def change_length_prefix(data: bytes, rng: random.Random) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    new = rng.choice([0, 1, length - 1, length + 1, length + 8, len(data), 2**63, 2**64 - 1])
    return struct.pack("<Q", max(new, 0)) + data[8:]


def mutate_json(value: Any, rng: random.Random) -> Any:
    """``value`` with one field somewhere replaced, deleted or added."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        copy = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del copy[key]
        elif roll < 0.25:
            copy[f"extra{rng.randrange(3)}"] = rng.choice(NASTY_VALUES)
        elif roll < 0.55 and isinstance(copy[key], (dict, list, str)):
            copy[key] = mutate_nested(copy[key], rng)
        else:
            copy[key] = rng.choice(NASTY_VALUES)
        return copy
    if isinstance(value, list) and value and rng.random() < 0.8:
        copy_list = list(value)
        at = rng.randrange(len(copy_list))
        roll = rng.random()
        if roll < 0.2:
            del copy_list[at]
        elif roll < 0.3:
            copy_list.append(copy_list[at])
        elif roll < 0.6 and isinstance(copy_list[at], (dict, list, str)):
            copy_list[at] = mutate_nested(copy_list[at], rng)
        else:
            copy_list[at] = rng.choice(NASTY_VALUES)
        return copy_list
    return rng.choice(NASTY_VALUES)


def mutate_nested(value: Any, rng: random.Random) -> Any:
    if isinstance(value, str):
        try:  # the attnscope metadata is JSON inside a JSON string
            return json.dumps(mutate_json(json.loads(value), rng))
        except ValueError:
            return rng.choice(NASTY_VALUES)
    return mutate_json(value, rng)


def change_header_field(data: bytes, rng: random.Random) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = mutate_json(json.loads(data[8 : 8 + length]), rng)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def change_json_field(data: bytes, rng: random.Random) -> bytes:
    return json.dumps(mutate_json(json.loads(data), rng)).encode()


FILE_MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    lambda d, r: flip_bits(d, r),
    lambda d, r: flip_bits(d, r, end=header_end(d)),
    lambda d, r: flip_bits(d, r, begin=header_end(d)),  # in the weights: loads, other values
    random_bytes,
    truncate,
    append_garbage,
    change_length_prefix,
    change_header_field,
    change_header_field,
    change_header_field,
]
INDEX_MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    lambda d, r: flip_bits(d, r),
    random_bytes,
    truncate,
    append_garbage,
    change_json_field,
    change_json_field,
    change_json_field,
]


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("memory_map", [False, True], ids=["read", "mapped"])
def test_mutated_capture_files_load_consistently_or_are_refused(
    tmp_path: Path, memory_map: bool
) -> None:
    good = labelled_capture().save(tmp_path / "good.safetensors").read_bytes()
    assert try_load(tmp_path / "good.safetensors", memory_map) == "loaded"
    rng = random.Random(SEED + memory_map)
    outcomes = {"loaded": 0, "refused": 0}
    start = time.perf_counter()
    with watchdog(WATCHDOG_SECONDS):
        for case in range(CASES_PER_TARGET * 2):
            mutation = rng.choice(FILE_MUTATIONS)
            mutated = mutation(good, rng)
            path = tmp_path / f"case{case}.safetensors"
            path.write_bytes(mutated)
            try:
                outcomes[try_load(path, memory_map)] += 1
            except Exception as error:  # name the case, so it can be replayed
                raise AssertionError(f"case {case} ({mutated[:200]!r}...): {error!r}") from error
    assert time.perf_counter() - start < WATCHDOG_SECONDS
    # the mix really explores both sides: flipped weight bytes still load, most edits refuse
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 100, outcomes


def test_mutated_spill_folders_load_consistently_or_are_refused(tmp_path: Path) -> None:
    good = spilled_capture(tmp_path / "good")
    files = sorted(p.name for p in good.iterdir())
    assert try_load(good, memory_map=False) == "loaded"
    rng = random.Random(SEED + 7)
    outcomes = {"loaded": 0, "refused": 0}
    with watchdog(WATCHDOG_SECONDS):
        for case in range(CASES_PER_TARGET * 2):
            folder = tmp_path / f"case{case}"
            shutil.copytree(good, folder)
            victim = rng.choice(files)
            raw = (folder / victim).read_bytes()
            mutations = INDEX_MUTATIONS if victim == "index.json" else FILE_MUTATIONS
            mutated = rng.choice(mutations)(raw, rng)
            (folder / victim).write_bytes(mutated)
            try:
                outcomes[try_load(folder, memory_map=True)] += 1
            except Exception as error:
                raise AssertionError(
                    f"case {case}, {victim}: {mutated[:200]!r}: {error!r}"
                ) from error
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 100, outcomes


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "kind": "self", "file": "../outside.safetensors"}, "not a file spilled"),
        ({"name": "x", "kind": "self", "file": "/etc/passwd"}, "not a file spilled"),
        ({"name": "x", "kind": "self", "file": 3}, "all strings"),
        ({"name": "other", "kind": "self", "file": "00000.safetensors"}, "does not hold call 0"),
        ("00000.safetensors", "all strings"),
    ],
    ids=["parent folder", "absolute path", "file a number", "name of another call", "no object"],
)
def test_a_spill_index_cannot_point_outside_its_folder_or_at_another_call(
    tmp_path: Path, entry: object, message: str
) -> None:
    folder = spilled_capture(tmp_path / "spill")
    shutil.copy(folder / "00000.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((folder / "index.json").read_text())
    index["calls"][0] = entry
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(AttnScopeError, match=message):
        attnscope.load(folder)


@pytest.mark.parametrize(
    "index",
    [[], {"format": "attnscope.spill", "format_version": 1e400}, {"format": "attnscope.spill"}],
    ids=["a list", "infinite version", "no version"],
)
def test_a_spill_index_of_the_wrong_shape_is_refused(tmp_path: Path, index: object) -> None:
    folder = spilled_capture(tmp_path / "spill")
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(AttnScopeError, match=r"index\.json"):
        attnscope.load(folder)
