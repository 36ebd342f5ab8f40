"""Training cost of the seed-compatible layers: one epoch of a small seq2seq Transformer.

Model: ``nn.Transformer`` (2 + 2 layers, d_model=128, 4 heads, feed-forward 512, dropout 0.1,
batch_first) built from custom layers, embeddings and a readout; a copy task, teacher forcing,
AdamW. One epoch: ``--batches`` batches of 32 sequences of 10 tokens, train mode, grad on
(the layers' slow path: ``_sa_block`` / ``_mha_block`` run on every forward).
Variants (same initial parameters, each its own optimizer), interleaved epoch by epoch, each
round starting one variant later:
  plain      nn.TransformerEncoderLayer / nn.TransformerDecoderLayer: no weights kept
  seed       the original subclasses: ``_sa_block`` / ``_mha_block`` call the attention with
             need_weights=True, average_attn_weights=False and store what it returns
  attnscope  attnscope.TransformerEncoderLayerWithAttn / TransformerDecoderLayerWithAttn
             (weights computed when read; the loop reads them once per epoch, as a logger would)
  attnscope_read_every_step
             the same, reading the last decoder layer's attn_weights after every forward, as
             a model whose forward returns them does (one layer's weights computed per step)
Writes benchmarks/results/layers_train.json: each variant's median and minimum epoch seconds,
ratios to plain, and the paired ratio (median over rounds of the per-round ratio).
Timings are measured, never asserted in tests.

    python benchmarks/layers_train.py [--rounds 15] [--batches 50] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import attnscope

D_MODEL, HEADS, FF, LAYERS, VOCAB, LENGTH, BATCH = 128, 4, 512, 2, 12, 10, 32


class SeedEncoderLayer(nn.TransformerEncoderLayer):
    """The original: every forward stores the attention's own per-head weights."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.attn_weights: Tensor | None = None

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):  # type: ignore[no-untyped-def]
        x, self.attn_weights = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=True, average_attn_weights=False, is_causal=is_causal,
        )  # fmt: skip
        return self.dropout1(x)


class SeedDecoderLayer(nn.TransformerDecoderLayer):
    """The original: the masked self-attention's weights in ``attn_weights``."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.attn_weights: Tensor | None = None

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):  # type: ignore[no-untyped-def]
        x, self.attn_weights = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=True, average_attn_weights=False, is_causal=is_causal,
        )  # fmt: skip
        return self.dropout1(x)


class Seq2Seq(nn.Module):
    def __init__(self, encoder_layer: type, decoder_layer: type) -> None:
        super().__init__()
        kwargs = dict(dim_feedforward=FF, dropout=0.1, batch_first=True)
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.position = nn.Embedding(LENGTH + 1, D_MODEL)
        self.transformer = nn.Transformer(
            D_MODEL,
            HEADS,
            custom_encoder=nn.TransformerEncoder(
                encoder_layer(D_MODEL, HEADS, **kwargs), LAYERS, enable_nested_tensor=False
            ),
            custom_decoder=nn.TransformerDecoder(decoder_layer(D_MODEL, HEADS, **kwargs), LAYERS),
            batch_first=True,
        )
        self.readout = nn.Linear(D_MODEL, VOCAB)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        positions = torch.arange(src.size(1))
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1))
        hidden = self.transformer(
            self.embed(src) + self.position(positions),
            self.embed(tgt_in) + self.position(positions[: tgt_in.size(1)]),
            tgt_mask=mask,
            tgt_is_causal=True,
        )
        return self.readout(hidden)


def batches(count: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        src = torch.randint(0, 10, (BATCH, LENGTH), generator=generator)
        tgt_in = torch.cat([torch.full((BATCH, 1), 10), src[:, :-1]], dim=1)
        out.append((src, tgt_in))
    return out


def epoch_runner(
    model: Seq2Seq, data: list[tuple[Tensor, Tensor]], read: bool, every_step: bool = False
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    decoder = model.transformer.decoder.layers[-1]

    def run() -> None:
        model.train()
        for src, tgt_in in data:
            logits = model(src, tgt_in)
            if every_step:  # as a model whose forward returns the last layer's weights
                assert decoder.attn_weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
            loss = loss_fn(logits.reshape(-1, VOCAB), src.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if read:  # once per epoch, as a logger would
            assert decoder.attn_weights.shape == (BATCH, HEADS, LENGTH, LENGTH)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "layers_train.json"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = batches(args.batches)
    classes = {
        "plain": (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer),
        "seed": (SeedEncoderLayer, SeedDecoderLayer),
        "attnscope": (
            attnscope.TransformerEncoderLayerWithAttn,
            attnscope.TransformerDecoderLayerWithAttn,
        ),
    }
    torch.manual_seed(0)
    reference = Seq2Seq(*classes["plain"]).state_dict()
    runners = {}
    for name, (enc, dec) in classes.items():
        model = Seq2Seq(enc, dec)
        model.load_state_dict(reference)
        runners[name] = epoch_runner(model, data, read=name != "plain")
    model = Seq2Seq(*classes["attnscope"])
    model.load_state_dict(reference)
    runners["attnscope_read_every_step"] = epoch_runner(model, data, read=True, every_step=True)
    for run in runners.values():  # warm-up epoch
        run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for round_ in range(args.rounds):
        shift = round_ % len(order)
        for name, run in order[shift:] + order[:shift]:
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
        times = ", ".join(f"{name} {values[-1]:.3f}" for name, values in samples.items())
        print(f"round {round_ + 1}/{args.rounds}: {times} s", file=sys.stderr, flush=True)
    result: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "batches_per_epoch": args.batches,
        "model": f"nn.Transformer {LAYERS}+{LAYERS} x {D_MODEL}, {HEADS} heads, ff {FF}, "
        f"batch {BATCH} x {LENGTH}",
    }
    plain = samples["plain"]
    for name, values in samples.items():
        result[f"{name}_median_s"] = round(statistics.median(values), 4)
        result[f"{name}_min_s"] = round(min(values), 4)
        if name != "plain":
            result[f"{name}_median_ratio"] = round(
                statistics.median(values) / statistics.median(plain), 3
            )
            result[f"{name}_min_ratio"] = round(min(values) / min(plain), 3)
            result[f"{name}_paired_ratio"] = round(
                statistics.median(v / b for v, b in zip(values, plain, strict=True)), 3
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
