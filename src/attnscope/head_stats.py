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


class RowTable:
    """Rows of per-head values under ``columns``; iterate for dicts, ``to_csv()`` for a file."""

    columns: tuple[str, ...] = ()

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, object]]:
        return iter(dict(row) for row in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, object]:
        return dict(self.rows[index])

    def to_csv(self, path: str | None = None) -> str:
        """The table as CSV text; also written to ``path`` when given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
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


class HeadTable(RowTable):
    """Rows of per-head statistics; iterate for dicts, ``to_csv()`` for a file, print to read."""

    columns = COLUMNS

    def roles(self) -> dict[str, int]:
        """How many heads have each role."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[str(row["role"])] = counts.get(str(row["role"]), 0) + 1
        return counts

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
_CHUNK_BYTES = 1 << 19  # the share of a core's L2 cache a pass over the map works in


def row_statistics(
    weights: Tensor,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    *,
    scratch: Tensor | None = None,
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
    ``scratch``, a 1-D tensor of that dtype, is the work buffer of the two passes over the map
    when it is large enough (a caller measuring call after call keeps one).

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
    batch, heads, queries, keys = weights.shape
    device = weights.device
    query_pos = _positions(query_mask, batch, queries, device)  # (batch, query)
    key_pos = _positions(key_mask, batch, keys, device)  # (batch, key)
    offsets = _offset(query_pos), _offset(key_pos)
    apart = _apart(query_pos, key_pos, offsets, weights)
    # Two passes over the map (entropy, distance), a few (item, head) maps at a time so that
    # the work buffer stays in the cache: each pass reads and writes it several times.
    shared = apart.dim() == 2  # one layout for all: chunks may cut across batch items
    maps = weights.reshape(batch * heads, queries, keys) if shared else weights
    entropy = torch.empty(maps.shape[:-1], dtype=weights.dtype, device=device)
    distance = torch.empty_like(entropy)
    one = maps[0].numel() * weights.element_size()
    step = max(1, _CHUNK_BYTES // max(1, one))
    if scratch is None or scratch.numel() < maps[:step].numel() or scratch.dtype != maps.dtype:
        scratch = torch.empty(maps[:step].numel(), dtype=weights.dtype, device=device)
    # log(0) takes the vector math's slow path, about 25 times a nonzero's cost, and masked
    # keys make most of a padded map 0: the log is taken of max(w, tiny) instead, whose
    # product with w is 0 where w is (exactly 0 log 0's limit) and w log w elsewhere
    tiny = torch.finfo(weights.dtype).tiny
    for start in range(0, maps.size(0), step):
        part = maps[start : start + step]
        work = scratch[: part.numel()].view(part.shape)
        torch.clamp_min(part, tiny, out=work).log_().mul_(part)
        torch.sum(work, dim=-1, out=entropy[start : start + step])
        near = apart if shared else apart[start : start + step]
        torch.sum(torch.mul(part, near, out=work), dim=-1, out=distance[start : start + step])
    entropy, distance = entropy.view(batch, heads, queries), distance.view(batch, heads, queries)
    entropy.neg_()

    if all(o is not None and not bool(o.any()) for o in offsets):  # p(i) = i: diagonals
        return {
            "entropy": entropy,
            "distance": distance,
            "first": weights[..., 0],
            "previous": _diagonal(weights, -1, queries),
            "self": _diagonal(weights, 0, queries),
        }
    # the key index at each valid position, per batch item; `keys` where there is none
    key_at = torch.full((batch, keys + 1), keys, dtype=torch.long, device=device)
    key_index = torch.arange(keys, device=device).expand(batch, keys)
    key_at.scatter_(1, torch.where(key_pos >= 0, key_pos, keys), key_index)
    key_at[:, keys] = keys

    def share(position: Tensor) -> Tensor:  # (batch, query) positions -> the weights there
        index = key_at.gather(1, position.clamp(0, keys))
        index = index.masked_fill((position < 0) | (query_pos < 0), keys)
        exists = index < keys
        index = index.clamp_max(keys - 1)[:, None, :, None].expand(batch, heads, queries, 1)
        return weights.gather(-1, index).squeeze(-1) * exists[:, None, :]

    zeros = torch.zeros_like(query_pos)
    return {
        "entropy": entropy,
        "distance": distance,
        "first": share(zeros),
        "previous": share(query_pos - 1),
        "self": share(query_pos),
    }


def _diagonal(weights: Tensor, offset: int, queries: int) -> Tensor:
    """``w[..., i, i + offset]`` for every query ``i``, 0 where that key does not exist."""
    diagonal = weights.diagonal(offset=offset, dim1=-2, dim2=-1)
    before = -offset if offset < 0 else 0
    after = queries - before - diagonal.size(-1)
    return torch.nn.functional.pad(diagonal, (before, after))


def _apart(
    query_pos: Tensor,
    key_pos: Tensor,
    offsets: tuple[Tensor | None, Tensor | None],
    weights: Tensor,
) -> Tensor:
    """``|p(i) - p(j)|``, broadcasting against the weights: one (query, key) matrix where the
    layout is the same for every batch item (right padding, or the same left padding on both
    sides), (batch, 1, query, key) otherwise."""
    queries, keys = query_pos.size(1), key_pos.size(1)
    device, dtype = weights.device, weights.dtype
    offset_q, offset_k = offsets
    if offset_q is not None and offset_k is not None:  # p(i) = i - offset: one run of tokens
        shift = offset_k - offset_q
        steps = torch.arange(queries, device=device)[:, None] - torch.arange(keys, device=device)
        if bool((shift == shift[0]).all()):
            return (steps + shift[0]).abs().to(dtype)
        return (steps + shift[:, None, None, None]).abs().to(dtype)
    return (query_pos[:, None, :, None] - key_pos[:, None, None, :]).abs().to(dtype)


def _offset(positions: Tensor) -> Tensor | None:
    """Per batch item the ``o`` with ``p(i) = i - o`` for every valid token, or None when the
    valid tokens are not one run (a mask with holes)."""
    index = torch.arange(positions.size(1), device=positions.device)
    valid = positions >= 0
    offsets = torch.where(valid, index - positions, -1)
    offset = offsets.amax(dim=-1)
    if not bool(((offsets == offset[:, None]) | ~valid).all()):
        return None
    return offset.clamp_min(0)


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
