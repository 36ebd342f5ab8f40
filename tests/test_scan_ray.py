"""attnscope scan --engine ray on a local 2-worker cluster gives the local engine's table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_scan_support import TEXTS, save_tiny

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")


def test_ray_engine_equals_local(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "model")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(TEXTS * 6) + "\n", encoding="utf-8")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_AUTH_MODE": "disabled",
    }
    outputs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        command = [sys.executable, "-m", "attnscope", "scan", str(folder), "--data", str(data)]
        command += ["--out", str(out), "--shard-size", "5", "--batch-size", "4", "--quiet"]
        command += ["--engine", engine, "--workers", "2"] if engine == "ray" else []
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[engine] = out
    local = pq.read_table(outputs["local"] / "heads.parquet")
    remote = pq.read_table(outputs["ray"] / "heads.parquet")
    assert remote.schema.metadata == local.schema.metadata  # texts, tokens: all, once
    assert remote.column("count").to_pylist() == local.column("count").to_pylist()
    for name in local.column_names[4:]:  # a worker's one thread may round its GEMMs apart
        assert remote.column(name).to_pylist() == pytest.approx(
            local.column(name).to_pylist(), rel=1e-6, abs=1e-9
        )
    assert len(list((outputs["ray"] / "shards").glob("*.json"))) == 9
