"""A scan killed with SIGKILL and rerun with the same command equals an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnscope.cli import main
from test_scan_support import save_tiny

pq = pytest.importorskip("pyarrow.parquet")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "around",
    "quickly",
    "and",
    "people",
    "watched",
    "from",
    "far",
]


def _command(folder: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "attnscope",
        "scan",
        str(folder),
        "--data",
        str(data),
        "--out",
        str(out),
        "--shard-size",
        "20",
        "--batch-size",
        "8",
        "--max-length",
        "48",
        "--quiet",
    ]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error"}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_scan_resumes_to_the_uninterrupted_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_tiny(tmp_path / "model")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(1200)]
    data = tmp_path / "data.txt"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shards = -(-len(lines) // 20)

    out = tmp_path / "killed"
    process = subprocess.Popen(
        _command(folder, data, out),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((out / "shards").glob("[0-9]*.json"))) >= 3:
                break
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    written = len(list((out / "shards").glob("[0-9]*.json")))
    assert 3 <= written < shards, "the scan ended before it could be killed"
    assert not (out / "heads.parquet").exists()
    # a write the kill interrupted leaves a temporary file at most; the rerun removes it
    (out / "shards" / ".000099.json.abc.tmp").write_bytes(b'{"half": ')

    # the same command again (here in-process: it is the same code), and one uninterrupted
    assert main(_command(folder, data, out)[3:]) == 0
    assert f"resumed: {written * 20} records from earlier shards" in capsys.readouterr().out
    assert not list((out / "shards").glob(".*.tmp"))
    whole = tmp_path / "whole"
    assert main(_command(folder, data, whole)[3:]) == 0
    got = pq.read_table(out / "heads.parquet")
    want = pq.read_table(whole / "heads.parquet")
    assert got.column("count").to_pylist() == want.column("count").to_pylist()
    assert got.schema.metadata == want.schema.metadata  # texts and tokens: none lost or twice
    for name in got.column_names[4:]:  # the killed process's kernels may round apart
        assert got.column(name).to_pylist() == pytest.approx(
            want.column(name).to_pylist(), rel=1e-6, abs=1e-12
        )
    got_top, want_top = pq.read_table(out / "top.parquet"), pq.read_table(whole / "top.parquet")
    assert got_top.column("value").to_pylist() == pytest.approx(
        want_top.column("value").to_pylist(), rel=1e-6
    )
