"""``attnscope scan``: a local model over a data file into a folder, resumable.

Everything that can be refused is refused before the model runs: options, the data file
(read through once: format, field, texts), the model folder (config and tokenizer files), and
``--out`` (a scan with other settings, or files of ours without a manifest).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AttnScopeError
from ..progress import Progress
from ..run import check_tokenizer
from ..serialization import write_atomically
from .engine import ShardResult, ShardRunner
from .reader import TextFile, import_pyarrow_parquet, open_texts
from .store import ScanFolder, shards_of
from .tables import heads_table, top_ids, top_table


@dataclass
class ScanOptions:
    model: str | None
    data: str
    out: str
    text_field: str = "text"
    batch_size: int = 32
    max_length: int = 128
    limit: int | None = None
    shard_size: int = 1000
    top_k: int = 10
    engine: str = "local"
    workers: int = 2
    address: str | None = None
    progress: bool = True


@dataclass
class ScanSummary:
    folder: Path
    records: int
    counts: dict[str, int]
    seconds: float  # in all: checks, loading, computing, writing
    computed: int  # records computed by this run (the rest came from shard files)
    files: list[Path]
    compute_seconds: float = 0.0  # computing those


class TextProgress(Progress):
    """The progress bar, counting texts: ``advance(n)`` and a texts/s rate."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        super().__init__(total, "scan", enabled=enabled)
        self.done = self.first = done

    def advance(self, count: int) -> None:
        self.done += count - 1
        self.update()

    def _line(self, now: float, note: str) -> str:
        filled = int(30 * self.done / self.total)
        elapsed = now - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "-" * (30 - filled)
        return f"scan [{bar}] {self.done}/{self.total} texts {elapsed:5.1f}s {rate:6.1f} texts/s"


def check_options(options: ScanOptions) -> None:
    for name in ("batch_size", "max_length", "shard_size", "top_k", "workers"):
        value = getattr(options, name)
        least = 2 if name == "max_length" else 1
        if value < least:
            flag = "--" + name.replace("_", "-")
            raise AttnScopeError(f"{flag} must be at least {least}, got {value}")
    if options.engine not in ("local", "ray"):
        raise AttnScopeError(f"--engine must be local or ray, got {options.engine!r}")
    if options.engine == "local" and options.address is not None:
        raise AttnScopeError("--address names a Ray cluster: add --engine ray")


def model_folder(model: str | None) -> Path:
    """The model folder, refused before loading when it lacks a config or a tokenizer."""
    from ..run import default_model_path

    folder = Path(model or default_model_path())
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "is not a local folder"
        raise AttnScopeError(
            f"model {folder} {what}; attnscope scan reads local model folders only (nothing "
            "is downloaded): give the folder that holds config.json, the weights and the "
            "tokenizer"
        )
    if not (folder / "config.json").is_file():
        raise AttnScopeError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    check_tokenizer(folder)
    return folder.resolve()


def load_model(folder: Path) -> tuple[Any, Any]:
    from ..run import _load

    tokenizer, model = _load(str(folder))
    return tokenizer, model


def settings_of(folder: Path, data: TextFile, options: ScanOptions) -> dict[str, Any]:
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {
        "model": str(folder),
        "model_config_sha256": config,
        "data_sha256": data.sha256,
        "data_size": data.size,
        "data_format": data.format,
        "text_field": data.text_field,
        "max_length": options.max_length,
        "limit": options.limit,
        "shard_size": options.shard_size,
        "top_k": options.top_k,
    }


def run_scan(options: ScanOptions) -> ScanSummary:
    """The whole command: check, resume or start, compute the missing shards, write tables."""
    start = time.perf_counter()
    check_options(options)
    import_pyarrow_parquet()  # before any work: the tables need it
    if options.engine == "ray":
        from .ray_engine import import_ray

        import_ray()
    data = open_texts(options.data, options.text_field, options.limit)
    folder_path = model_folder(options.model)
    shards = -(-data.records // options.shard_size)
    settings = settings_of(folder_path, data, options)
    folder = ScanFolder(options.out, settings, shards)
    tokenizer, model = load_model(folder_path)
    ShardRunner(  # checks max_length against the model before anything is written
        model,
        tokenizer,
        batch_size=options.batch_size,
        max_length=options.max_length,
        top_k=options.top_k,
    )
    folder.begin()
    done = folder.done()
    progress = TextProgress(data.records, folder.records_done(), options.progress)
    computed = 0

    def finished(index: int, records: int, result: ShardResult) -> None:
        nonlocal computed
        folder.write_shard(index, records, result)
        computed += records

    pending = shards_of(data.texts(), options.shard_size, done)
    computing = time.perf_counter()
    if options.engine == "local":
        runner = ShardRunner(
            model,
            tokenizer,
            batch_size=options.batch_size,
            max_length=options.max_length,
            top_k=options.top_k,
        )
        for index, records in pending:
            result = runner.run(records, on_batch=progress.advance)
            if result.empty:
                progress.advance(result.empty)
            finished(index, len(records), result)
    else:
        del model
        from .ray_engine import WorkerSpec, run_ray

        spec = WorkerSpec(str(folder_path), options.batch_size, options.max_length, options.top_k)

        def on_done(index: int, records: int, result: ShardResult) -> None:
            finished(index, records, result)
            progress.advance(records)

        run_ray(pending, spec, options.workers, options.address, on_done)
    progress.close()
    compute_seconds = time.perf_counter() - computing
    covered, total = folder.merged()
    files = write_outputs(folder.path, total, settings, data)
    return ScanSummary(
        folder.path,
        covered,
        total.counts(),
        time.perf_counter() - start,
        computed,
        files,
        compute_seconds,
    )


def write_outputs(
    folder: Path, total: ShardResult, settings: dict[str, Any], data: TextFile
) -> list[Path]:
    """``heads.parquet``, ``top.parquet`` and ``report.html``, each written atomically."""
    pq = import_pyarrow_parquet()
    heads = heads_table(total.sums, total.counts())
    wanted = top_ids(total.sums)  # one more pass over the file: the top texts themselves
    top = top_table(total.sums, {i: t or "" for i, t in data.texts() if i in wanted})
    written = []
    for name, table in (("heads.parquet", heads), ("top.parquet", top)):

        def write(file: Any, table: Any = table) -> None:
            pq.write_table(table, file)

        written.append(write_atomically(folder / name, write))
    from .report import report_html

    page = report_html(total, settings).encode("utf-8")
    written.append(write_atomically(folder / "report.html", lambda f: f.write(page)))
    return written


def summary(result: ScanSummary) -> str:
    counts = result.counts
    lines = [
        f"scanned {counts['texts']} texts ({counts['tokens']} tokens) of {result.records} "
        f"records into {result.folder}",
    ]
    if result.computed < result.records:
        lines.append(f"resumed: {result.records - result.computed} records from earlier shards")
    if counts["truncated"]:
        lines.append(
            f"{counts['truncated']} texts were longer than --max-length and were truncated to it"
        )
    if counts["empty"]:
        lines.append(f"{counts['empty']} empty records were skipped")
    if result.computed:
        rate = result.computed / result.compute_seconds if result.compute_seconds > 0 else 0.0
        lines.append(
            f"computed {result.computed} records in {result.compute_seconds:.1f} s "
            f"({rate:.1f} texts/s); {result.seconds:.1f} s in all"
        )
    lines.extend(f"wrote {path}" for path in result.files)
    return "\n".join(lines)


def print_summary(result: ScanSummary) -> None:
    print(summary(result), file=sys.stdout)
