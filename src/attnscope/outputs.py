"""Where the commands write: paths checked before any work, nothing replaced unasked.

``attnscope run`` and ``attnscope view`` write files of fixed names (``attention.safetensors``,
``report.html``, ``head_stats.csv``, PNG figures, the ``--out`` page). A folder that already
holds one of them is refused, naming the files, unless ``--force`` is given: running twice into
one folder must be a choice, not an accident that replaces the first run's results. Options that
need a folder refuse a file, and the reverse, before a model is loaded or a capture read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import AttnScopeError
from .maps import KINDS, AttentionMaps


def check_folder(path: Path, option: str) -> None:
    """Refuse a folder ``option`` that names a file or lies inside one (it is created later).

    >>> import tempfile, pathlib
    >>> check_folder(pathlib.Path(tempfile.mkdtemp()) / "new" / "folder", "--out")
    """
    place = _first_existing(path)
    if place is not None and not place.is_dir():
        where = "is" if place == path else f"lies inside {place}, which is"
        raise AttnScopeError(
            f"{option} {path} {where} a file, not a folder; give a folder (new or existing)"
        )


def check_file(path: Path, option: str, example: str) -> None:
    """Refuse a file ``option`` that names a folder or lies in no existing folder."""
    if path.is_dir():
        raise AttnScopeError(
            f"{option} {path} is a folder; give the path of a file, e.g. {path / example}"
        )
    if path.parent.is_dir():
        return
    place = _first_existing(path.parent)
    if place is not None and not place.is_dir():
        raise AttnScopeError(
            f"{option} {path} lies inside {place}, which is a file, not a folder; give a path "
            "in a folder"
        )
    raise AttnScopeError(
        f"{option} {path}: folder {path.parent} does not exist; create it first or give a path "
        "in an existing folder"
    )


def _first_existing(path: Path) -> Path | None:
    return next((place for place in (path, *path.parents) if place.exists()), None)


def refuse_replacing(paths: Iterable[Path], force: bool) -> None:
    """Refuse to write over existing files unless ``force``; never write a file over a folder.

    >>> refuse_replacing([Path("surely-not-here.html")], force=False)
    """
    planned = list(dict.fromkeys(paths))
    folders = [p for p in planned if p.is_dir()]
    if folders:
        raise AttnScopeError(
            f"{_listed(folders)} {'is a folder' if len(folders) == 1 else 'are folders'} where "
            "attnscope writes a file; move it away or choose another output folder"
        )
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise AttnScopeError(
            f"would replace {len(existing)} existing file{'s' if len(existing) > 1 else ''}: "
            f"{_listed(existing)}; pass --force to replace them, or choose another folder"
        )


def figure_names(maps: AttentionMaps) -> list[str]:
    """The PNG files ``plot.save_figures`` writes for ``maps``: two per kind present."""
    present = {maps.kind(name) for name in maps.names}
    return [
        f"{stem}-{kind}.png" for kind in KINDS if kind in present for stem in ("layers", "heads")
    ]


def report_files(folder: Path, maps: AttentionMaps) -> list[Path]:
    """The files ``report.write_report`` writes into ``folder`` for ``maps``."""
    from .report import ROLLOUT, with_rollout

    files = [folder / "report.html", folder / "head_stats.csv"]
    figures = [folder / "figures" / name for name in figure_names(maps)]
    if ROLLOUT in with_rollout(maps):
        figures.append(folder / "figures" / "rollout.png")
    return files + figures


def _listed(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:8])
    return shown + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
