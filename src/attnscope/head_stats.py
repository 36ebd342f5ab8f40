"""Per-head statistics and roles: what each head tends to look at.

For every (module, head), averaged over the batch and the valid query rows (rows that are not
padding): entropy (nats), mean attention distance ``Σ_j w_ij |i - j|``, and the share of
attention on the first token, the previous token and the token itself. Roles, first match:

- ``monotonic-alignment`` (cross-attention): head-wise argmax keys never go back by more than
  one position across 90% of consecutive queries, and move forward overall;
- ``broad``: entropy at least 90% of a uniform row's over the same keys;
- ``previous-token``, ``self``, ``first-token``: that share is at least 0.5;
- ``local``: mean distance at most 1.5 positions;
- ``mixed``: none of the above.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import torch
from torch import Tensor

from .analysis import row_entropy
from .errors import AttnScopeError
from .maps import AttentionMaps

COLUMNS = ("module", "head", "entropy", "distance", "first", "previous", "self", "role")


class HeadTable:
    """Rows of per-head statistics; iterate for dicts, ``to_csv()`` for a file, print to read."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, object]]:
        return iter(dict(row) for row in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, object]:
        return dict(self.rows[index])

    def roles(self) -> dict[str, int]:
        """How many heads have each role."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[str(row["role"])] = counts.get(str(row["role"]), 0) + 1
        return counts

    def to_csv(self, path: str | None = None) -> str:
        """The table as CSV text; also written to ``path`` when given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
        text = buffer.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8") as file:
                file.write(text)
        return text

    def __str__(self) -> str:
        width = max([len("module")] + [len(str(r["module"])) for r in self.rows])
        lines = [f"{'module':<{width}}  head  entropy  distance  first  previous   self  role"]
        for r in self.rows:
            lines.append(
                f"{r['module']!s:<{width}}  {r['head']:>4}  {r['entropy']:7.3f}  "
                f"{r['distance']:8.2f}  {r['first']:5.2f}  {r['previous']:8.2f}  {r['self']:5.2f}  "
                f"{r['role']}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def head_stats(attn: AttentionMaps) -> HeadTable:
    """One row per (module, head): entropy, distance, first/previous/self shares and a role.

    >>> previous = torch.zeros(1, 1, 4, 4)
    >>> previous[0, 0, 0, 0] = 1.0
    >>> previous[0, 0, 1:, :3] = torch.eye(3)
    >>> head_stats(AttentionMaps.from_tensors({"l": previous}, kinds="causal"))[0]["role"]
    'previous-token'
    """
    if len(attn) == 0:
        raise AttnScopeError("head_stats of an empty AttentionMaps")
    rows: list[dict[str, object]] = []
    for name in attn.names:
        weights = attn.display(name).weights.float()
        kind = attn.kind(name)
        for head, stats in enumerate(_stats(weights, kind)):
            rows.append({"module": name, "head": head, **stats})
    return HeadTable(rows)


def _stats(weights: Tensor, kind: str) -> list[dict[str, object]]:
    batch, heads, queries, keys = weights.shape
    valid = weights.sum(dim=-1).amax(dim=1) > 0.5  # (batch, query): not padding
    if not bool(valid.any()):
        raise AttnScopeError("every query row is empty (all padding): nothing to measure")
    key_valid = weights.sum(dim=(1, 2)) > 0  # keys anyone attends to
    q = torch.arange(queries).view(queries, 1).float()
    k = torch.arange(keys).view(1, keys).float()
    distance_matrix = (q - k).abs()
    entropy = row_entropy(weights)  # (b, h, q)
    distance = (weights * distance_matrix).sum(-1)
    first = weights[..., 0]
    previous = torch.zeros_like(first)
    previous[..., 1:] = torch.diagonal(weights[..., 1:, :], dim1=-2, dim2=-1)[..., : queries - 1]
    self_share = torch.zeros_like(first)
    size = min(queries, keys)
    self_share[..., :size] = torch.diagonal(weights, dim1=-2, dim2=-1)[..., :size]
    mask = valid.unsqueeze(1).expand(batch, heads, queries)
    counts = mask.sum(dim=(0, 2)).clamp_min(1).float()

    def mean(values: Tensor) -> Tensor:
        return (values * mask).sum(dim=(0, 2)) / counts

    uniform = torch.log(key_valid.sum(-1).clamp_min(1).float()).mean()
    results = []
    for head in range(heads):
        row: dict[str, object] = {
            "entropy": float(mean(entropy)[head]),
            "distance": float(mean(distance)[head]),
            "first": float(mean(first)[head]),
            "previous": float(mean(previous)[head]) if queries > 1 else 0.0,
            "self": float(mean(self_share)[head]),
        }
        monotonic = kind == "cross" and _monotonic(weights[:, head], valid)
        row["role"] = _role(row, float(uniform), monotonic)
        results.append(row)
    return results


def _monotonic(weights: Tensor, valid: Tensor) -> bool:
    steps, forward = 0, 0.0
    kept = 0
    for item in range(weights.size(0)):
        hard = weights[item].argmax(dim=-1)[valid[item]]
        if hard.numel() < 2:
            continue
        moves = hard[1:] - hard[:-1]
        steps += moves.numel()
        kept += int((moves >= -1).sum())
        forward += float(hard[-1] - hard[0])
    return steps > 0 and kept >= 0.9 * steps and forward > 0


def _role(row: dict[str, object], uniform_entropy: float, monotonic: bool) -> str:
    if monotonic:
        return "monotonic-alignment"
    if uniform_entropy > 0 and float(row["entropy"]) >= 0.9 * uniform_entropy - 1e-9:  # type: ignore[arg-type]
        return "broad"  # first: on two keys a uniform head puts 0.5 on itself and the first
    for role, key in (("previous-token", "previous"), ("self", "self"), ("first-token", "first")):
        if float(row[key]) >= 0.5:  # type: ignore[arg-type]
            return role
    if float(row["distance"]) <= 1.5:  # type: ignore[arg-type]
        return "local"
    return "mixed"
