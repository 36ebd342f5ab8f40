"""Users' files: a spill never writes into a folder of other files, saves refuse paths that
cannot be files, and every file attnscope writes gets the mode the umask asks for."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.serialization import current_umask
from models import encoder, sequence

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def small_maps() -> AttentionMaps:
    return AttentionMaps.from_tensors({"a": torch.softmax(torch.randn(1, 2, 3, 3), -1)})


def spill_into(folder: Path) -> None:
    model = encoder().eval()
    with torch.no_grad(), attnscope.capture(model, spill=folder):
        model(sequence(1, 3))


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- spill folders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "present",
    [["00000.safetensors"], ["notes.txt"], [".hidden"], ["00000.safetensors", "keep.bin"]],
    ids=["a file of a spill's name", "another file", "a hidden file", "several"],
)
def test_spill_refuses_a_folder_of_other_files_and_touches_none(
    tmp_path: Path, present: list[str]
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in present:
        (folder / name).write_bytes(f"the user's {name}".encode())
    before = listing(folder)
    with (
        pytest.raises(
            AttnScopeError,
            match=rf"not empty and not an attnscope spill .*{present[0]}.*empty or new folder",
        ),
        attnscope.capture(encoder(), spill=folder),
    ):
        pass
    assert listing(folder) == before


def test_spill_into_an_empty_or_new_folder_still_works(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spill_into(empty)
    spill_into(tmp_path / "new" / "nested")
    for folder in (empty, tmp_path / "new" / "nested"):
        assert len(attnscope.load(folder).names) == 2


def test_spill_refuses_an_existing_spill_without_changing_it(tmp_path: Path) -> None:
    folder = tmp_path / "spill"
    spill_into(folder)
    before = listing(folder)
    with (
        pytest.raises(AttnScopeError, match="already holds a spilled capture"),
        attnscope.capture(encoder(), spill=folder),
    ):
        pass
    assert listing(folder) == before


# -- saving -------------------------------------------------------------------------------


def test_save_to_a_folder_says_to_give_a_file_and_leaves_it_alone(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(AttnScopeError, match=r"it is a folder; give the path of a file"):
        small_maps().save(folder)
    assert list(folder.iterdir()) == []
    assert list(tmp_path.iterdir()) == [folder]


def test_save_into_a_missing_folder_or_under_a_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AttnScopeError, match="does not exist; create it first"):
        small_maps().save(tmp_path / "missing" / "cap.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AttnScopeError, match="is a file, not a folder"):
        small_maps().save(tmp_path / "file" / "cap.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- file modes ---------------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_saved_files_get_the_mode_the_umask_asks_for(tmp_path: Path, mask: int) -> None:
    """``mkstemp`` creates files 0600 whatever the umask: shared captures were unreadable."""
    expected = 0o666 & ~mask
    with umask(mask):
        saved = small_maps().save(tmp_path / "cap.safetensors")
        spill_into(tmp_path / "spill")
        page = attnscope.view(small_maps()).save(tmp_path / "page.html")
        resaved = small_maps().save(saved)  # replacing a file gives it the same mode
    assert mode(saved) == expected
    assert mode(resaved) == expected
    assert mode(page) == expected
    for spilled in (tmp_path / "spill").iterdir():
        assert mode(spilled) == expected, spilled.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap.safetensors", "page.html", "spill"]


@posix_only
def test_the_umask_is_read_without_changing_it_under_other_threads(tmp_path: Path) -> None:
    """Reading the umask with os.umask sets it for a moment; a file another thread created
    then would get the wrong mode. Other threads keep creating files while saves run."""
    with umask(0o027):
        assert current_umask() == 0o027
        stop = threading.Event()
        modes: list[int] = []

        def create_files() -> None:
            count = 0
            while not stop.is_set():
                path = tmp_path / f"other-{count % 4}"
                path.unlink(missing_ok=True)
                with open(path, "w") as file:
                    file.write("x")
                modes.append(mode(path))
                count += 1

        worker = threading.Thread(target=create_files)
        worker.start()
        try:
            for index in range(50):
                small_maps().save(tmp_path / f"cap{index % 3}.safetensors")
        finally:
            stop.set()
            worker.join()
        assert os.umask(0o027) == 0o027  # unchanged
    assert modes and set(modes) == {0o640}
    assert mode(tmp_path / "cap0.safetensors") == 0o640
