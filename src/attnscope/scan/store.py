"""The scan's folder: settings, one file of sums per shard, the tables and the report.

Design note
-----------
``DIR/scan.json`` records the settings that decide the result (model folder and its
``config.json``'s hash, the data file's hash, size and format, text field, ``max_length``,
``limit``, ``shard_size``, ``top_k``). Shard ``n`` holds records ``[n * shard_size, (n + 1) *
shard_size)``; its sums go to ``DIR/shards/NNNNNN.json`` through a temporary file renamed over
the name (``serialization.write_atomically``), so a shard file is whole or absent whenever the
process dies (SIGKILL included). A rerun with the same settings skips the shards on disk and
computes the rest; one with other settings is refused before anything is written. The tables
are merged from the shard files in shard order, so an interrupted and resumed scan gives the
table of an uninterrupted one. Nothing but these names is ever written in ``DIR``, and a
``DIR`` that holds them without ``scan.json`` is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import AttnScopeError
from ..outputs import check_folder
from ..serialization import write_atomically
from .aggregate import FORMAT, Accumulator
from .engine import ShardResult

MANIFEST = "scan.json"
SHARDS = "shards"
OUTPUTS = ("heads.parquet", "top.parquet", "report.html")


class ScanFolder:
    """``DIR`` of one scan: opened (and refused, or resumed) before any model work."""

    def __init__(self, folder: str | Path, settings: dict[str, Any], shards: int) -> None:
        self.path = Path(folder)
        self.settings = settings
        self.shards = shards
        check_folder(self.path, "--out")
        manifest = self.path / MANIFEST
        if manifest.exists():
            self._check_manifest(manifest)
        else:
            ours = [self.path / n for n in (SHARDS, *OUTPUTS) if (self.path / n).exists()]
            if ours:
                raise AttnScopeError(
                    f"--out {self.path} holds {', '.join(str(p) for p in ours)} but no "
                    f"{MANIFEST}: not a scan this command can resume, and it would replace "
                    "them; choose another --out folder"
                )

    def _check_manifest(self, manifest: Path) -> None:
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
            before = recorded["settings"]
            assert isinstance(before, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise AttnScopeError(
                f"{manifest} is not a scan manifest attnscope can read; choose another --out folder"
            ) from None
        if recorded.get("format") != FORMAT or before != self.settings:
            changed = [
                f"{key}: {before.get(key)!r} then, {self.settings.get(key)!r} now"
                for key in sorted(set(before) | set(self.settings))
                if before.get(key) != self.settings.get(key)
            ] or [f"format {recorded.get('format')!r}, this attnscope writes {FORMAT}"]
            raise AttnScopeError(
                f"--out {self.path} holds a scan with other settings ({'; '.join(changed)}); "
                "rerun with the same settings to resume it, or choose another --out folder"
            )

    def begin(self) -> None:
        """Create ``DIR`` and its manifest (atomically); leftovers of a killed write go."""
        (self.path / SHARDS).mkdir(parents=True, exist_ok=True)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            data = {"format": FORMAT, "settings": self.settings, "shards": self.shards}
            text = json.dumps(data, indent=1, sort_keys=True).encode()
            write_atomically(manifest, lambda file: file.write(text))
        for temp in (self.path / SHARDS).glob(".*.tmp"):  # a write that a kill interrupted
            temp.unlink(missing_ok=True)

    def shard_path(self, index: int) -> Path:
        return self.path / SHARDS / f"{index:06d}.json"

    def done(self) -> set[int]:
        """Shards whose sums are on disk."""
        folder = self.path / SHARDS
        if not folder.is_dir():
            return set()
        found = set()
        for path in folder.glob("[0-9]*.json"):
            if path.stem.isdigit() and int(path.stem) < self.shards:
                found.add(int(path.stem))
        return found

    def write_shard(self, index: int, records: int, result: ShardResult) -> None:
        data = {
            "format": FORMAT,
            "shard": index,
            "records": records,
            **result.counts(),
            "skipped": result.skipped,
            "sums": result.sums.to_json(),
        }
        text = json.dumps(data, allow_nan=False, separators=(",", ":")).encode()
        write_atomically(self.shard_path(index), lambda file: file.write(text))

    def read_shard(self, index: int) -> tuple[int, ShardResult]:
        path = self.shard_path(index)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            result = ShardResult(
                Accumulator.from_json(
                    data["sums"], self.settings["max_length"], self.settings["top_k"]
                ),
                texts=int(data["texts"]),
                tokens=int(data["tokens"]),
                truncated=int(data["truncated"]),
                empty=int(data["empty"]),
                skipped=dict(data.get("skipped", {})),
            )
            return int(data["records"]), result
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise AttnScopeError(
                f"{path} cannot be read ({error}); delete it and rerun to compute that shard again"
            ) from None

    def merged(self) -> tuple[int, ShardResult]:
        """Every shard's sums merged in shard order, and the records they cover."""
        total = ShardResult(Accumulator(self.settings["max_length"], self.settings["top_k"]))
        records = 0
        for index in range(self.shards):
            count, result = self.read_shard(index)
            records += count
            total.merge(result)
        return records, total

    def records_done(self) -> int:
        return sum(self.read_shard(i)[0] for i in sorted(self.done()))


def shards_of(
    texts: Iterator[tuple[int, str | None]], shard_size: int, skip: set[int]
) -> Iterator[tuple[int, list[tuple[int, str | None]]]]:
    """(shard index, its records) in file order, leaving out the shards in ``skip``.

    >>> records = iter([(0, "a"), (1, "b"), (2, "c")])
    >>> [(n, [r for r, _ in rs]) for n, rs in shards_of(records, 2, skip={0})]
    [(1, [2])]
    """
    current: list[tuple[int, str | None]] = []
    index = 0
    for position, record in enumerate(texts):
        shard = position // shard_size
        if shard != index:
            if current:
                yield index, current
            current, index = [], shard
        if shard not in skip:
            current.append(record)
    if current:
        yield index, current
