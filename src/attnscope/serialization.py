"""The safetensors file format, written atomically and read without unpickling.

Design note
-----------
A safetensors file is 8 bytes of little-endian header length, a JSON header (per tensor: dtype,
shape, byte offsets; plus a ``__metadata__`` map of strings) and the raw bytes. The format is
small and frozen, so attnscope reads and writes it here with torch alone and keeps torch its
only required dependency; files are interchangeable with the ``safetensors`` package (the
tests check both directions). Reading checks every offset against the file size, so a
truncated or foreign file raises ``AttnScopeError`` naming the file, never a crash or a pickle.
Writing goes to a temporary file in the target folder, flushed and fsynced, then renamed over
the target: a crash leaves the old file or none, never half of one.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

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
    target = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    blobs: list[Tensor] = []
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise AttnScopeError(f"cannot save tensor {key!r} of dtype {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        blob = data  # written through the buffer protocol below: no copy of the bytes
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + blob.numel()],
        }
        blobs.append(blob)
        offset += blob.numel()
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise AttnScopeError(f"cannot save to {target}: folder {folder} does not exist")
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            for blob in blobs:
                if blob.numel():
                    file.write(blob.numpy().data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def read_safetensors(
    path: str | os.PathLike[str], *, memory_map: bool = False
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file into CPU tensors and its metadata; never unpickles.

    With ``memory_map`` the tensors are views of a private (copy-on-write) mapping of the file:
    nothing is read until used, and memory holds only the pages touched.
    """
    source = Path(path)
    try:
        size = source.stat().st_size
        with source.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise _bad(source, f"{size} bytes is too short for a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise _bad(
                    source,
                    "the header length runs past the end of the file "
                    "(truncated, or not a safetensors file)",
                )
            try:
                header = json.loads(file.read(header_len).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise _bad(source, f"the header is not valid JSON ({error})") from None
            access = mmap.ACCESS_COPY if memory_map else mmap.ACCESS_READ
            data = mmap.mmap(file.fileno(), 0, access=access) if size > 8 else None
    except FileNotFoundError:
        raise AttnScopeError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise AttnScopeError(
            f"{source} is a folder; give the path of a .safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise _bad(source, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    tensors: dict[str, Tensor] = {}
    end_of_data = 0
    for key, entry in header.items():
        dtype, shape, begin, end = _entry(source, key, entry)
        if start + end > size:
            raise _bad(source, f"tensor {key!r} runs past the end of the file (truncated?)")
        assert data is not None
        if end == begin:
            flat = torch.empty(0, dtype=torch.uint8)
        elif memory_map:
            flat = torch.frombuffer(
                data, dtype=torch.uint8, offset=start + begin, count=end - begin
            )
        else:
            flat = torch.frombuffer(bytearray(data[start + begin : start + end]), dtype=torch.uint8)
        tensors[key] = flat.view(dtype).reshape(shape)
        end_of_data = max(end_of_data, end)
    if data is not None and not memory_map:
        data.close()
    if start + end_of_data != size:
        raise _bad(source, f"{size - start - end_of_data} bytes after the last tensor")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _entry(source: Path, key: str, entry: object) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict):
        raise _bad(source, f"header entry {key!r} is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in _CODES:
        raise _bad(source, f"tensor {key!r} has an unsupported dtype {code!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _bad(source, f"tensor {key!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        raise _bad(source, f"tensor {key!r} has invalid data_offsets {offsets!r}")
    dtype = _CODES[code]
    begin, end = offsets
    count = 1
    for dim in shape:
        count *= dim
    if begin < 0 or end - begin != count * dtype.itemsize:
        raise _bad(source, f"tensor {key!r}: offsets {offsets} do not match shape {shape}")
    return dtype, shape, begin, end


def _bad(source: Path, problem: str) -> AttnScopeError:
    return AttnScopeError(f"{source}: {problem}")
