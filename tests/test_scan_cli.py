"""attnscope scan: data formats, the three outputs, clear errors, nothing of the user's replaced."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from attnscope.cli import main
from test_scan_support import (
    STATS,
    TEXTS,
    alone,
    assert_rows_close,
    expected_rows,
    save_tiny,
    tiny,
    tokenizer,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model"))


def _write(path: Path, texts: list[str | None]) -> Path:
    if path.suffix == ".txt":
        path.write_text("".join(f"{t or ''}\n" for t in texts), encoding="utf-8")
    elif path.suffix == ".jsonl":
        lines = [json.dumps({"id": n, "body": t}) for n, t in enumerate(texts)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "body"])
            writer.writerows([n, t or ""] for n, t in enumerate(texts))
    else:
        pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), path)
    return path


def _scan(folder: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["scan", str(folder), "--data", str(data), "--out", str(out), "--quiet", *extra])


def test_every_format_gives_the_table_of_texts_run_alone(folder: Path, tmp_path: Path) -> None:
    texts: list[str | None] = [*TEXTS[:4], None, *TEXTS[4:]]  # an empty record: id 4, skipped
    model = tiny("bert", torch.float32)  # the folder's weights (same seed)
    want = expected_rows(alone(model, tokenizer(), [t for t in texts if t]))
    tables = []
    for suffix in (".txt", ".jsonl", ".csv", ".parquet"):
        data = _write(tmp_path / f"data{suffix}", texts)
        out = tmp_path / f"out{suffix}"
        field = [] if suffix == ".txt" else ["--text-field", "body"]
        assert _scan(folder, data, out, "--batch-size", "3", "--shard-size", "3", *field) == 0
        heads = pq.read_table(out / "heads.parquet")
        assert_rows_close(heads.to_pylist(), want, rtol=1e-5)
        meta = json.loads(heads.schema.metadata[b"attnscope"])
        assert meta == {"texts": 7, "tokens": meta["tokens"], "truncated": 0, "empty": 1}
        tables.append(heads)
    for other in tables[1:]:
        assert other.equals(tables[0])  # same batches, same kernels: the same bits


def test_top_texts_are_the_highest_per_text_means(folder: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.txt", TEXTS)
    assert _scan(folder, data, tmp_path / "out", "--top-k", "3", "--shard-size", "2") == 0
    top = pq.read_table(tmp_path / "out" / "top.parquet").to_pylist()
    reference = alone(tiny("bert", torch.float32), tokenizer(), TEXTS)
    assert len(top) == len(reference) * len(STATS) * 3
    for (name, head), entry in reference.items():
        for stat in STATS:
            got = [r for r in top if (r["module"], r["head"], r["statistic"]) == (name, head, stat)]
            assert [r["rank"] for r in got] == [1, 2, 3]
            best = sorted(entry["texts"][stat], key=lambda t: (-t[0], t[1]))[:3]
            assert [r["value"] for r in got] == pytest.approx([v for v, _ in best], rel=1e-5)
            # ids of input rows; near-ties may swap between kernels, values may not
            assert {r["id"] for r in got} <= {t for _, t in entry["texts"][stat]}
            assert [r["text"] for r in got] == [TEXTS[r["id"]] for r in got]


def test_report_is_offline_and_shows_every_head(folder: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.jsonl", [*TEXTS, "<script>alert(1)</script>"])
    out = tmp_path / "out"
    assert _scan(folder, data, out, "--text-field", "body") == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<rect") >= 2 * 4 * len(STATS)  # every (layer, head) of each heatmap
    for stat in ("entropy", "distance", "first token", "previous token"):
        assert stat in page


def test_truncated_texts_are_counted_and_reported(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "data.txt", TEXTS)
    assert _scan(folder, data, tmp_path / "out", "--max-length", "5") == 0
    lengths = [len(ids) for ids in tokenizer()(TEXTS)["input_ids"]]
    over = sum(n > 5 for n in lengths)
    assert f"{over} texts were longer than --max-length" in capsys.readouterr().out
    meta = json.loads(
        pq.read_table(tmp_path / "out" / "heads.parquet").schema.metadata[b"attnscope"]
    )
    assert meta["truncated"] == over and meta["tokens"] == sum(min(n, 5) for n in lengths)
    assert "truncated to 5 tokens: " + str(over) in (tmp_path / "out" / "report.html").read_text()


def test_limit_scans_the_first_records(folder: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.txt", TEXTS)
    assert _scan(folder, data, tmp_path / "a", "--limit", "3") == 0
    assert _scan(folder, _write(tmp_path / "three.txt", TEXTS[:3]), tmp_path / "b") == 0
    a = pq.read_table(tmp_path / "a" / "heads.parquet")
    b = pq.read_table(tmp_path / "b" / "heads.parquet")
    assert a.column("count").to_pylist() == b.column("count").to_pylist()


def _error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_data_files_are_refused_clearly(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cases = {
        "missing.txt": "does not exist",
        "empty.txt": "is empty",
        "blank.txt": "no text",
        "data.xml": "unknown format",
        "latin.txt": "not UTF-8",
        "broken.parquet": "not a readable Parquet",
        "bad.jsonl": "line 2 is not JSON",
        "nofield.jsonl": "line 1 has no field 'text'",
        "nocolumn.csv": "no column 'text'",
        "nocolumn.parquet": "no column 'text'",
        "number.jsonl": "holds a int, not text",
    }
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "data.xml").write_text("<a/>")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "nocolumn.csv").write_text("body\nhello\n")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocolumn.parquet")
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    for name, message in cases.items():
        assert message in _error(capsys, _scan(folder, tmp_path / name, out)), name
    assert "is a folder" in _error(capsys, _scan(folder, tmp_path, out))
    assert not out.exists()


def test_model_folder_without_tokenizer_is_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    data = _write(tmp_path / "data.txt", TEXTS)
    assert "has no tokenizer" in _error(capsys, _scan(bare, data, tmp_path / "out"))
    assert "not a local folder" in _error(capsys, _scan(tmp_path / "nope", data, tmp_path / "o"))
    assert not (tmp_path / "out").exists()


def test_out_folder_with_other_settings_is_refused_and_kept(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "data.txt", TEXTS)
    out = tmp_path / "out"
    assert _scan(folder, data, out, "--shard-size", "3") == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    err = _error(capsys, _scan(folder, data, out, "--shard-size", "3", "--max-length", "16"))
    assert "other settings" in err and "max_length: 128 then, 16 now" in err
    _write(data, [*TEXTS, "one more"])
    assert "data_sha256" in _error(capsys, _scan(folder, data, out, "--shard-size", "3"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert {p: p.stat().st_mtime_ns for p in before} == stamps
    # our files without a manifest: not a scan to resume, and never replaced
    (out / "scan.json").unlink()
    assert "no scan.json" in _error(capsys, _scan(folder, data, out))
    # a rerun with the same settings is a resume: nothing computed again, same table
    _write(data, TEXTS)
    other = tmp_path / "again"
    assert _scan(folder, data, other, "--shard-size", "3") == 0
    table = pq.read_table(other / "heads.parquet")
    assert _scan(folder, data, other, "--shard-size", "3", "--batch-size", "2") == 0
    assert "resumed: 7 records" in capsys.readouterr().out
    assert pq.read_table(other / "heads.parquet").equals(table)


def test_bad_options_are_refused_before_any_work(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "data.txt", TEXTS)
    out = tmp_path / "out"
    for extra, message in (
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-length", "1"], "--max-length must be at least 2"),
        (["--max-length", "100000"], "at most 128 tokens"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--address", "auto"], "add --engine ray"),
    ):
        assert message in _error(capsys, _scan(folder, data, out, *extra))
    (tmp_path / "file").write_text("x")
    assert "not a folder" in _error(capsys, _scan(folder, data, tmp_path / "file"))
    assert not out.exists()
