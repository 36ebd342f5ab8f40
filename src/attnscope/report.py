"""The report next to a capture: ``report.html`` (page + head statistics + rollout),
``head_stats.csv`` and PNG figures. Used by ``attnscope demo`` and ``attnscope run``."""

from __future__ import annotations

import sys
from pathlib import Path

from .analysis import rollout
from .errors import AttnScopeError
from .head_stats import head_stats
from .maps import AttentionMaps
from .view import view

ROLLOUT = "rollout (self-attention, all layers)"


def with_rollout(maps: AttentionMaps) -> AttentionMaps:
    """The maps plus the rollout of their self-attention stack, as one more one-head map."""
    try:
        joint = rollout(maps, kind="self")
    except AttnScopeError:
        return maps  # no square self-attention stack to roll out
    tensors = {name: maps.calls(name) for name in maps.names}
    kinds = {name: maps.kind(name) for name in maps.names}
    tensors[ROLLOUT] = [joint.unsqueeze(1)]
    kinds[ROLLOUT] = "self"
    return AttentionMaps.from_tensors(tensors, kinds).with_tokens(maps.tokens, maps.target_tokens)


def write_report(
    maps: AttentionMaps, out_dir: str | Path, title: str, png: bool = True
) -> list[str]:
    """Write the report files into ``out_dir``; return their paths."""
    folder = Path(out_dir)
    stats = head_stats(maps)
    stats.to_csv(str(folder / "head_stats.csv"))
    shown = with_rollout(maps)
    page = view(shown, title=title, element_id="report", stats=stats)
    written = [str(page.save(folder / "report.html")), str(folder / "head_stats.csv")]
    if png:
        try:
            from .plot import plot_head, save_figures

            written += save_figures(maps, str(folder / "figures"))
            if ROLLOUT in shown:
                path = folder / "figures" / "rollout.png"
                plot_head(shown, ROLLOUT, 0).savefig(path, dpi=110)
                written.append(str(path))
        except AttnScopeError as error:  # matplotlib missing: the page alone still helps
            print(f"attnscope: no PNG figures ({error})", file=sys.stderr)
    return written
