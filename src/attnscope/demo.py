"""The copy-task demo: train a tiny encoder-decoder Transformer on the CPU and look inside it.

The model copies random digit sequences. To do so its decoder's cross-attention must learn to
look, at output position ``t``, at input position ``t``: a pattern anyone can check by eye,
and that ``alignment_score`` measures. The demo trains, evaluates under ``eval()`` +
``no_grad()`` (PyTorch's fused encoder path), captures a held-out batch with
``attnscope.capture`` and saves it with token labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .analysis import alignment as attention_alignment
from .analysis import mean_entropy
from .capture import capture
from .head_stats import head_stats
from .maps import AttentionMaps
from .progress import Progress

DIGITS = 10
BOS = 10
VOCAB = 11


@dataclass
class DemoConfig:
    """Sizes and training settings; the defaults train in well under 90 s on 2 cores."""

    seq_len: int = 10
    d_model: int = 64
    nhead: int = 4
    layers: int = 2
    ff: int = 128
    batch: int = 64
    steps: int = 1200
    lr: float = 2e-3
    seed: int = 0
    eval_size: int = 1000


class CopyTransformer(nn.Module):
    """Embeddings + ``nn.Transformer`` + a linear readout; teacher-forced forward."""

    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.position = nn.Embedding(config.seq_len + 1, config.d_model)
        self.transformer = nn.Transformer(
            config.d_model,
            config.nhead,
            config.layers,
            config.layers,
            config.ff,
            dropout=0.0,
            batch_first=True,
        )
        self.readout = nn.Linear(config.d_model, VOCAB)
        self.seq_len = config.seq_len

    def _embed(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.size(1), device=tokens.device)
        return self.embed(tokens) + self.position(positions)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=src.device)
        hidden = self.transformer(
            self._embed(src), self._embed(tgt_in), tgt_mask=mask, tgt_is_causal=True
        )
        return self.readout(hidden)

    @torch.no_grad()
    def greedy(self, src: Tensor) -> Tensor:
        """Decode ``seq_len`` tokens greedily, one step at a time."""
        memory = self.transformer.encoder(self._embed(src))
        out = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)
        for _ in range(self.seq_len):
            mask = nn.Transformer.generate_square_subsequent_mask(out.size(1), device=src.device)
            hidden = self.transformer.decoder(
                self._embed(out), memory, tgt_mask=mask, tgt_is_causal=True
            )
            out = torch.cat([out, self.readout(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
        return out[:, 1:]


def copy_batch(
    size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(source, decoder input, target): the target is the source; input is BOS + target[:-1]."""
    src = torch.randint(0, DIGITS, (size, seq_len), generator=generator)
    tgt_in = torch.cat([torch.full((size, 1), BOS), src[:, :-1]], dim=1)
    return src, tgt_in, src


@dataclass
class DemoResult:
    accuracy: float
    alignment: dict[str, float]
    entropy: dict[str, float]
    kinds: dict[str, str]
    train_seconds: float
    final_loss: float
    capture_path: Path
    maps: AttentionMaps = field(repr=False)


def train(config: DemoConfig, progress: bool = True) -> tuple[CopyTransformer, float, float]:
    """Train a copy model; return it, the last loss and the training time in seconds."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = CopyTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = nn.CrossEntropyLoss()
    bar = Progress(config.steps, "training", enabled=progress)
    start = time.perf_counter()
    loss_value = float("nan")
    model.train()
    for _ in range(config.steps):
        src, tgt_in, tgt = copy_batch(config.batch, config.seq_len, generator)
        logits = model(src, tgt_in)
        loss = loss_fn(logits.reshape(-1, VOCAB), tgt.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.update(f"loss {loss_value:.3f}")
    bar.close()
    return model, loss_value, time.perf_counter() - start


def run_demo(
    out: str | Path = "attnscope-demo", config: DemoConfig | None = None, progress: bool = True
) -> DemoResult:
    """Train, evaluate, capture a held-out batch and save it to ``out/attention.safetensors``."""
    config = config or DemoConfig()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, final_loss, seconds = train(config, progress)
    model.eval()
    held_out = torch.Generator().manual_seed(config.seed + 1_000_003)
    src, tgt_in, _ = copy_batch(config.eval_size, config.seq_len, held_out)
    with torch.no_grad():
        accuracy = float((model.greedy(src) == src).all(dim=1).float().mean())
    sample_src, sample_in = src[:8], tgt_in[:8]
    with torch.no_grad(), capture(model) as attn:
        model(sample_src, sample_in)
    tokens = [[str(int(t)) for t in row] for row in sample_src]
    target_tokens = [["<s>", *(str(int(t)) for t in row[1:])] for row in sample_in]
    maps = attn.with_tokens(tokens, target_tokens)
    path = maps.save(out_dir / "attention.safetensors")
    positions = torch.arange(config.seq_len)
    alignment = {
        n: float(attention_alignment(maps, n, positions).score or 0.0)
        for n in maps.select(kind="cross").names
    }
    entropy = {n: mean_entropy(maps[n]) for n in maps.names}
    kinds = {n: maps.kind(n) for n in maps.names}
    return DemoResult(accuracy, alignment, entropy, kinds, seconds, final_loss, path, maps)


def summary(result: DemoResult) -> str:
    """The text report printed by ``attnscope demo``."""
    lines = [
        f"held-out exact-sequence accuracy (eval + no_grad, greedy): {result.accuracy:.4f}",
        f"training time: {result.train_seconds:.1f} s, final loss {result.final_loss:.4f}",
        "",
        "mean attention entropy (nats) per layer and kind:",
    ]
    width = max(len(n) for n in result.entropy)
    for name, value in result.entropy.items():
        lines.append(f"  {name:<{width}}  {result.kinds[name]:<6}  {value:.3f}")
    lines.append("")
    lines.append("cross-attention alignment (share of target positions whose head-averaged")
    lines.append("argmax is the source position being copied):")
    for name, value in result.alignment.items():
        lines.append(f"  {name:<{width}}  {value:.3f}")
    lines.append("")
    lines.append("head roles (attnscope.head_stats):")
    table = head_stats(result.maps)
    for name in result.maps.names:
        roles = [str(row["role"]) for row in table if row["module"] == name]
        lines.append(f"  {name:<{width}}  {', '.join(roles)}")
    lines.append("")
    lines.append(f"capture saved to {result.capture_path} (load it with attnscope.load)")
    return "\n".join(lines)
