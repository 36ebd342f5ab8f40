"""Spilling a capture to disk as it runs: one safetensors file per call, read back mapped.

``capture(model, spill="DIR")`` hands each call's weights to a ``Spill`` as soon as they are
computed; it writes them to ``DIR/NNNNN.safetensors`` (atomically) and returns a memory-mapped
view of the file, so the capture holds pages of the page cache, not memory of its own: peak
memory stays near one module's weights. ``DIR/index.json`` is rewritten (atomically) after
every call, so the folder is a complete, loadable capture at every moment, even if the model
fails half way; ``attnscope.load(DIR)`` maps it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import Tensor

from ._version import __version__
from .errors import AttnScopeError
from .serialization import read_safetensors, write_safetensors

INDEX = "index.json"
FORMAT = "attnscope.spill"


class Spill:
    """Writes calls to a folder and keeps its index current."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=self.folder, prefix=".probe-")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise AttnScopeError(
                f"spill={str(folder)!r}: cannot write there ({error.strerror or error}); "
                "give a writable folder with room for the weights"
            ) from None
        if (self.folder / INDEX).exists():
            raise AttnScopeError(
                f"spill={str(folder)!r} already holds a spilled capture ({INDEX}); give an empty "
                "or new folder so nothing of it is overwritten"
            )
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
        handle, temp = tempfile.mkstemp(dir=self.folder, prefix=".index-", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(index, out)
        os.replace(temp, self.folder / INDEX)


def read_spill(folder: Path) -> list[tuple[str, str, Tensor]]:
    """(name, kind, memory-mapped weights) of every call in a spill folder, in order."""
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise AttnScopeError(f"{folder}/{INDEX} is not an attnscope spill index")
        if int(index["format_version"]) > 1:
            raise AttnScopeError(f"{folder}: spilled by a newer attnscope; upgrade to read it")
        return [
            (
                str(e["name"]),
                str(e["kind"]),
                read_safetensors(folder / str(e["file"]), memory_map=True)[0]["weights"],
            )
            for e in index["calls"]
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise AttnScopeError(f"{folder}/{INDEX} is damaged ({error!r})") from None
