"""Spilling a capture to disk as it runs: one safetensors file per call, read back mapped.

``capture(model, spill="DIR")`` hands each call's weights to a ``Spill`` as soon as they are
computed; it writes them to ``DIR/NNNNN.safetensors`` (atomically) and returns a memory-mapped
view of the file, so the capture holds pages of the page cache, not memory of its own: peak
memory stays near one module's weights. ``DIR/index.json`` is rewritten (atomically) after
every call, so the folder is a complete, loadable capture at every moment, even if the model
fails half way; ``attnscope.load(DIR)`` maps it back. ``DIR`` must be new or empty: a spill
never replaces a file it did not write.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from torch import Tensor

from ._version import __version__
from .errors import AttnScopeError
from .serialization import read_safetensors, write_atomically, write_safetensors

INDEX = "index.json"
FORMAT = "attnscope.spill"
_SPILL_FILE = re.compile(r"[0-9]{5,}\.safetensors")


class Spill:
    """Writes calls to a folder and keeps its index current."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            _refuse_a_folder_in_use(self.folder, str(folder))
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=self.folder, prefix=".probe-")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise AttnScopeError(
                f"spill={str(folder)!r}: cannot write there ({error.strerror or error}); "
                "give a writable folder with room for the weights"
            ) from None
        self.entries: list[dict[str, object]] = []

    def write(self, name: str, kind: str, weights: Tensor) -> Tensor:
        """Write one call; return its weights memory-mapped from the file."""
        file = f"{len(self.entries):05d}.safetensors"
        try:
            write_safetensors(
                self.folder / file, {"weights": weights}, {"name": name, "kind": kind}
            )
        except OSError as error:
            raise AttnScopeError(
                f"spilling {name!r} to {self.folder} failed ({error.strerror or error}); the "
                f"{len(self.entries)} calls before it are complete there"
            ) from None
        self.entries.append({"name": name, "kind": kind, "file": file})
        self._write_index()
        return read_safetensors(self.folder / file, memory_map=True)[0]["weights"]

    def _write_index(self) -> None:
        index = {
            "format": FORMAT,
            "format_version": 1,
            "attnscope_version": __version__,
            "calls": self.entries,
        }
        encoded = json.dumps(index).encode("utf-8")
        write_atomically(self.folder / INDEX, lambda out: out.write(encoded))


def _refuse_a_folder_in_use(folder: Path, given: str) -> None:
    """Spill only into a new or empty folder: a spill writes NNNNN.safetensors and index.json,
    and must never replace (or later be mistaken for) files it did not write."""
    if not folder.is_dir():
        return  # created below; a file there fails to be created as a folder
    if (folder / INDEX).exists():
        raise AttnScopeError(
            f"spill={given!r} already holds a spilled capture ({INDEX}); give an empty "
            "or new folder so nothing of it is overwritten"
        )
    present = sorted(entry.name for entry in folder.iterdir())
    if present:
        shown = ", ".join(present[:5]) + (
            f" and {len(present) - 5} more" if len(present) > 5 else ""
        )
        raise AttnScopeError(
            f"spill={given!r} is not empty and not an attnscope spill (it holds {shown}); give "
            "an empty or new folder, so no file of yours is overwritten"
        )


def read_spill(folder: Path) -> list[tuple[str, str, Tensor]]:
    """(name, kind, memory-mapped weights) of every call in a spill folder, in order."""
    calls = _read_index(folder)
    return [_read_call(folder, number, entry) for number, entry in enumerate(calls)]


def _read_index(folder: Path) -> list[object]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AttnScopeError(f"{path}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _damaged(folder, f"not valid JSON: {error}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise AttnScopeError(f"{path} is not an attnscope spill index")
    version = index.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _damaged(folder, f"format_version {version!r} is not a version number")
    if version > 1:
        raise AttnScopeError(f"{folder}: spilled by a newer attnscope; upgrade to read it")
    calls = index.get("calls")
    if not isinstance(calls, list):
        raise _damaged(folder, "it has no list of calls")
    return calls


def _read_call(folder: Path, number: int, entry: object) -> tuple[str, str, Tensor]:
    fields = entry if isinstance(entry, dict) else {}
    name, kind, file = fields.get("name"), fields.get("kind"), fields.get("file")
    if not (isinstance(name, str) and isinstance(kind, str) and isinstance(file, str)):
        raise _damaged(folder, f"call {number} needs a name, a kind and a file, all strings")
    if not _SPILL_FILE.fullmatch(file):
        # only the names Spill writes: an index must not lead the reader out of its folder
        raise _damaged(folder, f"call {number} names {file!r}, not a file spilled there")
    tensors, metadata = read_safetensors(folder / file, memory_map=True)
    if "weights" not in tensors or (metadata.get("name"), metadata.get("kind")) != (name, kind):
        raise _damaged(folder, f"{file} does not hold call {number} ({name!r}, {kind})")
    return name, kind, tensors["weights"]


def _damaged(folder: Path, problem: str) -> AttnScopeError:
    return AttnScopeError(
        f"{folder / INDEX} is damaged ({problem}); the spill cannot be read as a capture: "
        "capture again into a new folder"
    )
