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
    batch, heads, queries, _ = weights.shape
    valid = weights.sum(dim=-1).amax(dim=1) > 0.5  # (batch, query): not padding
    if not bool(valid.any()):
        raise AttnScopeError("every query row is empty (all padding): nothing to measure")
    key_valid = weights.sum(dim=(1, 2)) > 0  # keys anyone attends to
    per_row = row_statistics(weights)  # positions of the padded frame, as the map lays them
    mask = valid.unsqueeze(1).expand(batch, heads, queries)
    counts = mask.sum(dim=(0, 2)).clamp_min(1).float()
    means = {s: ((v.float() * mask).sum(dim=(0, 2)) / counts) for s, v in per_row.items()}
    uniform = torch.log(key_valid.sum(-1).clamp_min(1).float()).mean()
    results = []
    for head in range(heads):
        row: dict[str, object] = {s: float(means[s][head]) for s in STATISTICS}
        monotonic = kind == "cross" and _monotonic(weights[:, head], valid)
        row["role"] = _role(row, float(uniform), monotonic)
        results.append(row)
    return results


STATISTICS = ("entropy", "distance", "first", "previous", "self")


def row_statistics(
    weights: Tensor, query_mask: Tensor | None = None, key_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Each query row's statistics, ``{name: (batch, heads, query)}`` for ``STATISTICS``.

    Positions are counted over the valid tokens only (``query_mask`` (batch, query) and
    ``key_mask`` (batch, key), True where a token is real; None: all are), so padding on
    either side changes nothing: query ``i`` and key ``j`` at valid positions ``p(i)``,
    ``p(j)`` are ``|p(i) - p(j)|`` apart; ``first`` is the weight on the key at position 0
    (the attention sink's share), ``self`` on the key at ``p(i)``, ``previous`` on the key at
    ``p(i) - 1``: 0 for the row at position 0, which has no previous token, and 0 where no key
    sits at that position (cross-attention over fewer keys). ``entropy`` is in nats. Rows of
    padded queries come out as numbers too; the caller leaves them out. Computed in the
    weights' dtype (float16 and bfloat16 in float32): nothing is kept beyond the call.

    >>> w = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]]])
    >>> {k: v[0, 0].tolist() for k, v in row_statistics(w).items()}["previous"]
    [0.0, 0.5, 1.0]
    >>> left = torch.nn.functional.pad(w, (1, 0, 1, 0))  # one pad token in front
    >>> pad = torch.tensor([[False, True, True, True]])
    >>> row_statistics(left, pad, pad)["distance"][0, 0, 1:].tolist()
    [0.0, 0.5, 1.0]
    """
    if weights.dtype not in (torch.float32, torch.float64):
        weights = weights.float()
    batch, _, queries, keys = weights.shape
    device = weights.device
    query_pos = _positions(query_mask, batch, queries, device)  # (batch, query)
    key_pos = _positions(key_mask, batch, keys, device)  # (batch, key)
    # key index of each valid position, per batch item (keys past the last: index `keys`)
    key_at = torch.full((batch, keys + 1), keys, dtype=torch.long, device=device)
    valid_key = key_pos >= 0
    key_index = torch.arange(keys, device=device).expand(batch, keys)
    key_at.scatter_(1, torch.where(valid_key, key_pos, keys), key_index)
    key_at[:, keys] = keys

    log = torch.log(weights.clamp_min(torch.finfo(weights.dtype).tiny))  # 0 log 0 = 0
    entropy = -log.mul_(weights).sum(dim=-1)
    del log
    apart = (query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)).abs().to(weights.dtype)
    if bool((apart == apart[:1]).all()):  # the same layout for every item: one matrix
        distance = torch.einsum("bhqk,qk->bhq", weights, apart[0])
    else:
        distance = torch.einsum("bhqk,bqk->bhq", weights, apart)
    padded = torch.nn.functional.pad(weights, (0, 1))  # key `keys`: the zero weight of none

    def share(position: Tensor) -> Tensor:  # (batch, query) valid positions -> weights there
        index = key_at.gather(1, position.clamp(0, keys)).masked_fill(position < 0, keys)
        index = index.masked_fill(query_pos < 0, keys)
        shape = (batch, weights.size(1), queries, 1)
        return padded.gather(-1, index[:, None, :, None].expand(shape)).squeeze(-1)

    zeros = torch.zeros_like(query_pos)
    return {
        "entropy": entropy,
        "distance": distance,
        "first": share(zeros),
        "previous": share(query_pos - 1),
        "self": share(query_pos),
    }


def _positions(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Position of each token among the valid ones, -1 for padding: (batch, length)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    mask = mask.to(device=device, dtype=torch.bool)
    return torch.where(mask, mask.long().cumsum(-1) - 1, -1)


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
