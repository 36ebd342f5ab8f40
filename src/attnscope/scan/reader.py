"""Texts from a file, one record at a time: ``.txt``, ``.jsonl``, ``.csv``, ``.parquet``.

A record is a line of a ``.txt`` file, a non-blank line of a ``.jsonl`` file (a JSON object;
its ``text_field`` holds the text), a row of a ``.csv`` file (with a header naming the
``text_field`` column) or a row of a ``.parquet`` file (a string column ``text_field``). Its
id is its 0-based index among the file's records: what ``top.parquet`` names. A text that is
empty or only whitespace (an empty line, an empty cell, a null) is no text: it is skipped and
counted. ``open_texts`` checks the whole file (up to ``limit`` records) before any model work,
so a bad record is reported by its line or row, never half-way through a scan.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import AttnScopeError

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class TextFile:
    """A checked data file: where it is, how to read it, and what it holds."""

    path: Path
    format: str
    text_field: str | None  # None for .txt
    records: int  # records to scan (at most ``limit``)
    empty: int  # of which empty
    sha256: str
    size: int

    def texts(self) -> Iterator[tuple[int, str | None]]:
        """(record id, text or None when empty), in file order, ``records`` of them."""
        for index, (record, text) in enumerate(_records(self.path, self.format, self.text_field)):
            if index >= self.records:
                return
            yield record, text


def open_texts(path: str | Path, text_field: str = "text", limit: int | None = None) -> TextFile:
    """Check ``path`` (readable, a known format, the field present, at least one text).

    >>> import tempfile, pathlib
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = file.write_text("one\\n\\ntwo\\n")
    >>> data = open_texts(file)
    >>> data.records, data.empty, list(data.texts())
    (3, 1, [(0, 'one'), (1, None), (2, 'two')])
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if not file.exists():
        raise AttnScopeError(f"--data {file} does not exist")
    if file.is_dir():
        raise AttnScopeError(f"--data {file} is a folder; give a {', '.join(FORMATS)} file")
    if suffix not in FORMATS:
        raise AttnScopeError(
            f"--data {file}: unknown format {suffix or '(no extension)'!r}; give a "
            f"{', '.join(FORMATS)} file (one text a line, JSON lines with a {text_field!r} field, "
            "a CSV or Parquet table with that column)"
        )
    if limit is not None and limit < 1:
        raise AttnScopeError(f"--limit must be at least 1, got {limit}")
    try:
        digest, size = _digest(file)
        records = empty = 0
        field = None if suffix == ".txt" else text_field
        for _, text in _records(file, suffix, field):
            if limit is not None and records >= limit:
                break
            records += 1
            empty += text is None
    except OSError as error:
        raise AttnScopeError(f"cannot read --data {file} ({error.strerror or error})") from None
    if records == empty:
        what = "is empty" if records == 0 else f"holds {records} records but no text"
        raise AttnScopeError(f"--data {file} {what}: nothing to scan")
    return TextFile(file, suffix, field, records, empty, digest, size)


def _digest(file: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _records(file: Path, suffix: str, field: str | None) -> Iterator[tuple[int, str | None]]:
    if suffix == ".parquet":
        assert field is not None
        yield from _parquet(file, field)
        return
    try:
        with file.open(encoding="utf-8", newline="" if suffix == ".csv" else None) as stream:
            if suffix == ".txt":
                for index, line in enumerate(stream):
                    yield index, _text(line.rstrip("\n"))
            elif suffix == ".jsonl":
                assert field is not None
                yield from _jsonl(file, stream, field)
            else:
                assert field is not None
                yield from _csv(file, stream, field)
    except UnicodeDecodeError as error:
        raise AttnScopeError(
            f"--data {file} is not UTF-8 text (byte {error.start} of a chunk: {error.reason}); "
            "convert it to UTF-8"
        ) from None


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def _jsonl(file: Path, stream: Iterator[str], field: str) -> Iterator[tuple[int, str | None]]:
    record = 0
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            raise AttnScopeError(f"--data {file} line {number} is not JSON ({error})") from None
        if not isinstance(value, dict):
            raise AttnScopeError(
                f"--data {file} line {number} is a JSON {type(value).__name__}, not an object "
                f"with a {field!r} field"
            )
        if field not in value:
            fields = ", ".join(map(repr, list(value)[:10])) or "none"
            raise AttnScopeError(
                f"--data {file} line {number} has no field {field!r} (its fields: {fields}); "
                "name the text's field with --text-field"
            )
        text = value[field]
        if text is not None and not isinstance(text, str):
            raise AttnScopeError(
                f"--data {file} line {number}: field {field!r} holds a {type(text).__name__}, "
                "not text; name the text's field with --text-field"
            )
        yield record, _text(text)
        record += 1


def _csv(file: Path, stream: Iterator[str], field: str) -> Iterator[tuple[int, str | None]]:
    reader = csv.reader(stream)
    try:
        header = next(reader, None)
        if header is None:
            return
        if field not in header:
            columns = ", ".join(map(repr, header[:20]))
            raise AttnScopeError(
                f"--data {file} has no column {field!r} (its columns: {columns}); name the "
                "text's column with --text-field"
            )
        column = header.index(field)
        for index, row in enumerate(reader):
            if not row:  # a blank line
                continue
            if column >= len(row):
                raise AttnScopeError(
                    f"--data {file} row {index + 1} has {len(row)} fields, no {field!r}"
                )
            yield index, _text(row[column])
    except csv.Error as error:
        raise AttnScopeError(
            f"--data {file} is not a readable CSV file (line {reader.line_num}: {error})"
        ) from None


def _parquet(file: Path, field: str) -> Iterator[tuple[int, str | None]]:
    pq = import_pyarrow_parquet()
    try:
        table = pq.ParquetFile(file)
    except Exception as error:  # pyarrow's ArrowInvalid and kin for a file that is not one
        raise AttnScopeError(f"--data {file} is not a readable Parquet file ({error})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise AttnScopeError(
            f"--data {file} has no column {field!r} (its columns: "
            f"{', '.join(map(repr, names[:20]))}); name the text's column with --text-field"
        )
    kind = table.schema_arrow.field(field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise AttnScopeError(
            f"--data {file}: column {field!r} holds {kind}, not text; name the text's column "
            "with --text-field"
        )
    index = 0
    for batch in table.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield index, _text(value)
            index += 1


def import_pyarrow_parquet():  # type: ignore[no-untyped-def]
    """``pyarrow.parquet``, or an error naming the extra that brings it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AttnScopeError(
            "attnscope scan needs pyarrow: pip install 'attnscope[scan]'"
        ) from None
    return pq
