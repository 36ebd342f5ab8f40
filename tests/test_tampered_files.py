"""Tampered capture files: each inconsistent field gets an AttnScopeError naming the file and
the problem, raised by ``attnscope.load`` itself (never later, in a view), never another error."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError

Header = dict[str, Any]


def saved_capture(tmp_path: Path) -> Path:
    """Two modules, one with rows=, labelled: every field of the format has a value."""
    maps = AttentionMaps.from_tensors(
        {"enc": torch.softmax(torch.randn(1, 2, 3, 3), -1)}, kinds="self"
    ).with_tokens(["a", "b", "c"])
    maps._append("dec", "causal", torch.softmax(torch.randn(1, 2, 1, 3), -1), rows=[-1])
    return maps.save(tmp_path / "good.safetensors")


def split(raw: bytes) -> tuple[Header, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: object, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def with_length(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def edit_meta(change: Callable[[Header], None]) -> Callable[[Header], None]:
    """An edit of the attnscope metadata inside the safetensors header."""

    def edit(header: Header) -> None:
        meta = json.loads(header["__metadata__"]["attnscope"])
        change(meta)
        header["__metadata__"]["attnscope"] = json.dumps(meta)

    return edit


def first_tensor(header: Header) -> Header:
    return header[next(k for k in header if k != "__metadata__")]


def set_in(mapping: Header, key: str, value: object) -> None:
    mapping[key] = value


EDITS: dict[str, tuple[Callable[[Header], None], str]] = {
    "metadata a list": (lambda h: set_in(h, "__metadata__", ["x"]), "__metadata__ is not"),
    "metadata values not strings": (
        lambda h: set_in(h, "__metadata__", {"attnscope": 1}),
        "__metadata__ is not",
    ),
    "unknown dtype": (lambda h: set_in(first_tensor(h), "dtype", "F8_E9"), "unsupported dtype"),
    "dtype a list": (lambda h: set_in(first_tensor(h), "dtype", ["F32"]), "unsupported dtype"),
    "integer weights": (lambda h: set_in(first_tensor(h), "dtype", "I32"), "not attention"),
    "huge empty shape": (
        lambda h: first_tensor(h).update(shape=[2**62, 2**62, 0], data_offsets=[0, 0]),
        "larger than the file",
    ),
    "huge shape": (
        lambda h: first_tensor(h).update(shape=[2**32, 2**32], data_offsets=[0, 2**66]),
        "past the end",
    ),
    "a boolean dimension": (
        lambda h: set_in(first_tensor(h), "shape", [1, 2, True, 3, 3]),
        "invalid shape",
    ),
    "reversed offsets": (
        lambda h: set_in(first_tensor(h), "data_offsets", [72, 0]),
        "reversed data_offsets",
    ),
    "offsets beyond the file": (
        lambda h: set_in(first_tensor(h), "data_offsets", [10**6, 10**6 + 72]),
        "past the end",
    ),
    "overlapping tensors": (
        lambda h: set_in(h, "copy", dict(first_tensor(h))),
        "overlaps",
    ),
    "format_version infinite": (
        edit_meta(lambda m: set_in(m, "format_version", 1e400)),
        "no format_version",
    ),
    "format_version true": (
        edit_meta(lambda m: set_in(m, "format_version", True)),
        "no format_version",
    ),
    "attnscope header a list": (
        lambda h: set_in(h["__metadata__"], "attnscope", "[1, 2]"),
        "not an attnscope capture",
    ),
    "names a string": (edit_meta(lambda m: set_in(m, "names", "enc")), "names is not a list"),
    "names not strings": (edit_meta(lambda m: set_in(m, "names", [1])), "names is not a list"),
    "names repeated": (edit_meta(lambda m: set_in(m, "names", ["enc", "enc"])), "names repeat"),
    "kinds a list": (edit_meta(lambda m: set_in(m, "kinds", ["self"])), "kinds is not"),
    "unknown kind": (edit_meta(lambda m: m["kinds"].update(enc="sideways")), "kind must be"),
    "call of no tensor": (edit_meta(lambda m: m["calls"].update(enc=["9.9"])), "does not hold"),
    "rows out of range": (edit_meta(lambda m: m["rows"].update(dec=[7])), "lie outside"),
    "rows not numbers": (edit_meta(lambda m: m["rows"].update(dec=["0"])), "rows of 'dec'"),
    "rows of the wrong length": (
        edit_meta(lambda m: m["rows"].update(dec=[0, 1])),
        "2 rows but 1 queries",
    ),
    "rows of no module": (edit_meta(lambda m: m["rows"].update(other=[0])), "not in names"),
    "tokens too short": (
        edit_meta(lambda m: set_in(m, "tokens", ["a"])),
        "labels have 1",
    ),
    "tokens not strings": (
        edit_meta(lambda m: set_in(m, "tokens", [1, 2, 3])),
        "list of str",
    ),
    "tokens a mapping": (
        edit_meta(lambda m: set_in(m, "tokens", {"a": 1})),
        "list of str",
    ),
}


@pytest.mark.parametrize("memory_map", [False, True], ids=["read", "mapped"])
@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_an_inconsistent_field_is_refused_at_load(
    tmp_path: Path, edit: str, memory_map: bool
) -> None:
    header, data = split(saved_capture(tmp_path).read_bytes())
    change, message = EDITS[edit]
    change(header)
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(join(header, data))
    with pytest.raises(AttnScopeError, match=message) as caught:
        attnscope.load(path, memory_map=memory_map)
    assert str(path) in str(caught.value)


def test_the_untampered_capture_loads_with_its_rows_and_labels(tmp_path: Path) -> None:
    loaded = attnscope.load(saved_capture(tmp_path))
    assert loaded.rows("dec") == [-1]
    assert loaded.labels("dec") == (["c"], ["a", "b", "c"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (join([1, 2], b""), "not a JSON object"),
        (struct.pack("<Q", 80_000) + b"[" * 80_000, "not valid JSON"),  # nesting past the stack
        (with_length(b'{"x":{"shape":[' + b"9" * 5000 + b"]}}"), "not valid JSON"),
        (with_length(b"\xff\xfe{}"), "not valid JSON"),
    ],
    ids=["header a list", "deep nesting", "5000-digit number", "not utf-8"],
)
def test_a_header_that_is_no_json_object_is_refused(
    tmp_path: Path, raw: bytes, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(AttnScopeError, match=message):
        attnscope.load(path)


def test_unaligned_data_is_copied_not_mapped(tmp_path: Path) -> None:
    """A header whose length is no multiple of 8 (other writers allow it) leaves float data
    unaligned; mapping it would fail in torch, so those tensors are copied instead."""
    maps = AttentionMaps.from_tensors({"a": torch.softmax(torch.randn(1, 2, 3, 3), -1)})
    header, data = split(maps.save(tmp_path / "a.safetensors").read_bytes())
    encoded = json.dumps(header).encode() + b" "
    encoded += b" " * ((-len(encoded) % 8) + 1)  # one byte past a multiple of 8
    path = tmp_path / "unaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    assert torch.equal(attnscope.load(path, memory_map=True)["a"], maps["a"])


def test_other_paths_that_are_no_capture_file(tmp_path: Path) -> None:
    with pytest.raises(AttnScopeError, match="not a valid path"):
        attnscope.load(str(tmp_path / "a\x00b"))
    fifo = tmp_path / "pipe"
    try:
        os.mkfifo(fifo)
    except (AttributeError, OSError):
        pytest.skip("no FIFOs here")
    with pytest.raises(AttnScopeError, match="not a regular file"):  # opening it would block
        attnscope.load(fifo)


def test_many_mapped_files_hold_no_file_descriptor_each(tmp_path: Path) -> None:
    """Python's mmap keeps a descriptor per mapping: a long spill ran out of them (EMFILE)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    path = AttentionMaps.from_tensors({"a": torch.rand(1, 1, 2, 2)}).save(tmp_path / "a.st")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        held = [attnscope.load(path, memory_map=True)["a"] for _ in range(400)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all(torch.equal(t, held[0]) for t in held)
