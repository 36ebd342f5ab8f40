"""The safetensors file format, written atomically and read without unpickling.

Design note
-----------
A safetensors file is 8 bytes of little-endian header length, a JSON header (per tensor: dtype,
shape, byte offsets; plus a ``__metadata__`` map of strings) and the raw bytes. The format is
small and frozen, so attnscope reads and writes it here with torch alone and keeps torch its
only required dependency; files are interchangeable with the ``safetensors`` package (the
tests check both directions).

Reading checks the whole header before allocating anything: dtypes, shapes and offsets must
agree with each other and with the file size, and the tensors must tile the data with no gap
or overlap. A truncated, tampered or foreign file raises ``AttnScopeError`` naming the file,
never another exception, a huge allocation or a pickle.

Writing goes to a temporary file in the target folder, flushed and fsynced, then renamed over
the target: a crash leaves the old file or none, never half of one. The temporary file is
private while it is written (``mkstemp``); before the rename it gets the mode a plain ``open``
would have given it (``0o666`` less the umask), so saved files are as readable as any other.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, NamedTuple, TypeGuard

import torch
from torch import Tensor

from .errors import AttnScopeError

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODES = {code: dtype for dtype, code in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DIMS = 64
_UMASK_LOCK = threading.Lock()


# -- writing --------------------------------------------------------------------------------


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, str]
) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically; return the path.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> _ = write_safetensors(target, {"a": torch.arange(3.0)}, {"note": "hi"})
    >>> read_safetensors(target)[0]["a"]
    tensor([0., 1., 2.])
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    blobs: list[Tensor] = []
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise AttnScopeError(f"cannot save tensor {key!r} of dtype {tensor.dtype}")
        blob = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + blob.numel()],
        }
        blobs.append(blob)
        offset += blob.numel()
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    def write(file: IO[bytes]) -> None:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for blob in blobs:
            if blob.numel():
                file.write(blob.numpy().data)  # the buffer protocol: no copy of the bytes

    return write_atomically(path, write)


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves the old file or none, never half of one; the file gets the mode that
    ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> write_atomically(target, lambda file: file.write(b"hi")).read_bytes()
    b'hi'
    """
    target = Path(path)
    check_writable_file(target)
    folder = target.parent
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_name, 0o666 & ~current_umask())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def check_writable_file(target: Path) -> None:
    """Refuse, saying what to do, a file path that is a folder or lies in no folder."""
    if target.is_dir():
        raise AttnScopeError(
            f"cannot save to {target}: it is a folder; give the path of a file in it, "
            f"e.g. {target / 'attention.safetensors'}"
        )
    folder = target.parent
    if not folder.exists():
        raise AttnScopeError(
            f"cannot save to {target}: folder {folder} does not exist; create it first or "
            "give a path in an existing folder"
        )
    if not folder.is_dir():
        raise AttnScopeError(
            f"cannot save to {target}: {folder} is a file, not a folder; give a path in a folder"
        )


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only read the mask by setting it, and another thread that creates a file
    in between gets the temporary mask; Linux shows it in ``/proc/self/status`` instead.

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        # restrictive while it is set: a file another thread creates meanwhile stays private
        old = os.umask(0o077)
        os.umask(old)
    return old


# -- reading --------------------------------------------------------------------------------


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def read_safetensors(
    path: str | os.PathLike[str], *, memory_map: bool = False
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file into CPU tensors and its metadata; never unpickles.

    With ``memory_map`` the tensors are views of a private (copy-on-write) mapping of the file:
    nothing is read until used, and memory holds only the pages touched. The mapping keeps no
    file descriptor open, so a capture may map thousands of files.
    """
    source = Path(path)
    try:
        _check_regular_file(source)
        with source.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            header, start = _read_header(source, file, size)
            metadata = _metadata(source, header.pop("__metadata__", None))
            entries = {
                key: _entry(source, key, value, size, start) for key, value in header.items()
            }
            _check_layout(source, entries, size - start)
            if memory_map:
                return _mapped(source, size, start, entries), metadata
            return _copied(source, file, size, start, entries), metadata
    except FileNotFoundError:
        raise AttnScopeError(f"{source}: no such file") from None
    except OSError as error:
        raise AttnScopeError(f"{source}: cannot read it ({error.strerror or error})") from None


def _check_regular_file(source: Path) -> None:
    try:
        mode = source.stat().st_mode
    except ValueError:  # a NUL byte in the path
        raise AttnScopeError(f"{str(source)!r} is not a valid path") from None
    if stat.S_ISDIR(mode):
        raise AttnScopeError(f"{source} is a folder; give the path of a .safetensors file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise AttnScopeError(f"{source} is not a regular file; give a .safetensors file")


def _read_header(source: Path, file: IO[bytes], size: int) -> tuple[dict[str, object], int]:
    """The parsed JSON header and the offset where the data starts."""
    prefix = file.read(8)
    if len(prefix) < 8:
        raise _bad(source, f"{size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(_MAX_HEADER, size - 8):
        raise _bad(
            source,
            "the header length runs past the end of the file (truncated, or not a safetensors "
            "file)",
        )
    return _parse_header(source, file.read(header_len)), 8 + header_len


def _copied(
    source: Path, file: IO[bytes], size: int, start: int, entries: dict[str, _Entry]
) -> dict[str, Tensor]:
    """Each tensor in memory of its own (so dropping one frees it), read through a mapping."""
    if size - start == 0:
        return {key: torch.empty(entry.shape, dtype=entry.dtype) for key, entry in entries.items()}
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if len(data) != size:
            raise _bad(source, "the file changed while it was read; read it again")
        return {
            key: _typed(
                torch.frombuffer(
                    bytearray(data[start + entry.begin : start + entry.end]), dtype=torch.uint8
                ),
                entry,
            )
            for key, entry in entries.items()
        }


def _mapped(source: Path, size: int, start: int, entries: dict[str, _Entry]) -> dict[str, Tensor]:
    """Views of one private mapping of the file (torch's, which holds no file descriptor,
    where Python's ``mmap`` keeps one per file)."""
    if size - start == 0:
        return {key: torch.empty(entry.shape, dtype=entry.dtype) for key, entry in entries.items()}
    try:
        whole = torch.from_file(str(source), shared=False, size=size, dtype=torch.uint8)
    except RuntimeError as error:  # the file shrank since its header was read
        raise _bad(source, f"the file changed while it was read ({error}); read it again") from None
    return {
        key: _typed(whole[start + entry.begin : start + entry.end], entry)
        for key, entry in entries.items()
    }


def _typed(flat: Tensor, entry: _Entry) -> Tensor:
    """The bytes of one tensor as its dtype and shape."""
    if flat.numel() == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if flat.storage_offset() % entry.dtype.itemsize:
        # a header whose length is no multiple of 8 leaves the data unaligned, and torch views
        # only aligned bytes as wider elements: copy this tensor instead of mapping it
        flat = flat.clone()
    return flat.view(entry.dtype).reshape(entry.shape)


def _parse_header(source: Path, raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError: JSON errors and integers too long to convert; RecursionError: nesting
        raise _bad(source, f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _bad(source, "the header is not a JSON object")
    return header


def _metadata(source: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise _bad(source, "__metadata__ is not a JSON object of strings")
    return dict(metadata)


def _entry(source: Path, key: str, entry: object, file_size: int, start: int) -> _Entry:
    """One tensor's dtype, shape and offsets, each checked against the others and the file."""
    data_size = file_size - start
    if not isinstance(entry, dict):
        raise _bad(source, f"header entry {key!r} is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(code, str) and code in _CODES):
        raise _bad(source, f"tensor {key!r} has an unsupported dtype {code!r}")
    if not (_is_list_of_naturals(shape) and len(shape) <= _MAX_DIMS):
        raise _bad(source, f"tensor {key!r} has an invalid shape {shape!r}")
    if not (_is_list_of_naturals(offsets) and len(offsets) == 2):
        raise _bad(source, f"tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise _bad(source, f"tensor {key!r} has reversed data_offsets {offsets}")
    if end > data_size:
        raise _bad(source, f"tensor {key!r} runs past the end of the file (truncated?)")
    dtype = _CODES[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise _bad(source, f"tensor {key!r}: offsets {offsets} do not match shape {shape}")
    # An empty tensor's other dimensions hold no data, so nothing above bounds them: cap them
    # by the file's size, so no shape field can overflow torch or make a reader loop for ages.
    if math.prod(max(dim, 1) for dim in shape) > file_size:
        raise _bad(source, f"tensor {key!r} has a shape {shape} larger than the file")
    return _Entry(dtype, shape, begin, end)


def _is_list_of_naturals(value: object) -> TypeGuard[list[int]]:
    # bool is an int in Python, but ``true`` in a shape is damage, not a dimension
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value
    )


def _check_layout(source: Path, entries: dict[str, _Entry], data_size: int) -> None:
    """The tensors must tile the data exactly, as the format requires: no gap, no overlap."""
    reached = 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < reached:
            raise _bad(source, f"tensor {key!r} overlaps the tensor before it")
        if entry.begin > reached:
            raise _bad(source, f"{entry.begin - reached} bytes of no tensor before {key!r}")
        reached = entry.end
    if reached != data_size:
        raise _bad(source, f"{data_size - reached} bytes after the last tensor")


def _bad(source: Path, problem: str) -> AttnScopeError:
    return AttnScopeError(f"{source}: {problem}")
