"""Client code written against the original subclasses runs, unchanged, on attnscope's layers.

``OriginalEncoderLayer`` / ``OriginalDecoderLayer`` are the subclasses attnscope grew from (the
``coderlayer_with_attn.py`` of the projects built on the idea): ``_sa_block`` calls the
attention with ``need_weights=True, average_attn_weights=False`` and stores what it returns in
``attn_weights`` (for the decoder: its masked self-attention). ``Seq2Seq`` and the loops below
are the client code: one class pair or the other is passed in, nothing else changes.

Two documented differences are not exercised here: in train mode the original's weights are
after dropout and carry the graph (attnscope's: before dropout, detached; ``keep_attn_graph``
keeps a graph, see ``test_layers.py``), and under ``eval()`` + ``no_grad()`` with
``batch_first=True`` the original encoder layer takes PyTorch's fused path, skips
``_sa_block`` and keeps stale weights (attnscope's are those of the forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import attnscope
from reference import assert_weights_match, slow_path_weights

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

VOCAB, D, HEADS, LAYERS = 12, 16, 4, 2


# -- the original classes (the reference client code) ----------------------------------------


class OriginalEncoderLayer(nn.TransformerEncoderLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attn_weights = None

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):  # type: ignore[no-untyped-def]
        x, self.attn_weights = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            average_attn_weights=False,
            is_causal=is_causal,
        )
        return self.dropout1(x)


class OriginalDecoderLayer(nn.TransformerDecoderLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attn_weights = None

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):  # type: ignore[no-untyped-def]
        x, self.attn_weights = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            average_attn_weights=False,
            is_causal=is_causal,
        )
        return self.dropout1(x)


ORIGINAL = (OriginalEncoderLayer, OriginalDecoderLayer)
ATTNSCOPE = (attnscope.TransformerEncoderLayerWithAttn, attnscope.TransformerDecoderLayerWithAttn)


# -- the client code ------------------------------------------------------------------------


class Seq2Seq(nn.Module):
    """A copy-task model whose forward returns the last decoder layer's attention."""

    def __init__(self, classes: tuple[type, type], batch_first: bool, dropout: float) -> None:
        super().__init__()
        encoder_layer, decoder_layer = classes
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, D)
        self.encoder = nn.TransformerEncoder(
            encoder_layer(D, HEADS, 32, dropout, batch_first=batch_first),
            LAYERS,
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            decoder_layer(D, HEADS, 32, dropout, batch_first=batch_first), LAYERS
        )
        self.out = nn.Linear(D, VOCAB)

    def forward(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        if not self.batch_first:
            src, tgt = src.t(), tgt.t()
        memory = self.encoder(self.embed(src))
        length = tgt.size(1 if self.batch_first else 0)
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        hidden = self.decoder(self.embed(tgt), memory, tgt_mask=mask)
        attn = self.decoder.layers[-1].attn_weights  # read inside forward
        logits = self.out(hidden)
        return (logits if self.batch_first else logits.transpose(0, 1)), attn


def copy_batch(seed: int) -> tuple[Tensor, Tensor]:
    src = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(seed))
    return src, torch.cat([torch.full((4, 1), 10), src[:, :-1]], dim=1)


def train_loop(model: Seq2Seq, steps: int = 4) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, rows = [], []
    model.train()
    for step in range(steps):
        src, tgt_in = copy_batch(step)
        logits, attn = model(src, tgt_in)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), src.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        rows.append(attn.detach().sum(-1))
    return {"losses": losses, "rows": rows, "encoder": model.encoder.layers[0].attn_weights}


def eval_loop(model: Seq2Seq) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        src, tgt_in = copy_batch(99)
        logits, attn = model(src, tgt_in)
        encoder = [layer.attn_weights for layer in model.encoder.layers]
        fig = Figure(figsize=(8, 2))
        for head, ax in enumerate(fig.subplots(1, HEADS)):
            ax.imshow(attn[0, head].cpu().numpy(), cmap="viridis")
            ax.set_title(f"head {head + 1}")
    return {"logits": logits, "attn": attn, "encoder": encoder, "figure": fig}


# -- the test ---------------------------------------------------------------------------------


def twins(batch_first: bool, dropout: float = 0.0) -> tuple[Seq2Seq, Seq2Seq]:
    torch.manual_seed(0)
    original = Seq2Seq(ORIGINAL, batch_first, dropout)
    ours = Seq2Seq(ATTNSCOPE, batch_first, dropout)
    ours.load_state_dict(original.state_dict())
    return original, ours


@pytest.mark.parametrize("batch_first", [False, True])
def test_state_dicts_round_trip_both_ways(batch_first: bool) -> None:
    original, ours = twins(batch_first)
    assert list(original.state_dict()) == list(ours.state_dict())
    torch.manual_seed(5)
    other = Seq2Seq(ATTNSCOPE, batch_first, 0.0)
    original.load_state_dict(other.state_dict())  # attnscope's -> original's, strict
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name])
    src, tgt_in = copy_batch(3)
    original.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            original(src, tgt_in)[0], other(src, tgt_in)[0], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("batch_first", [False, True])
def test_train_loop_runs_unchanged(batch_first: bool) -> None:
    original, ours = twins(batch_first)
    theirs, mine = train_loop(original), train_loop(ours)
    torch.testing.assert_close(mine["losses"], theirs["losses"], atol=1e-4, rtol=1e-4)
    for got, expected in zip(mine["rows"], theirs["rows"], strict=True):
        torch.testing.assert_close(got, expected)  # every row sums to 1 (no dropout here)
    # after the last optimizer step both hold the weights of the last forward
    torch.testing.assert_close(mine["encoder"], theirs["encoder"].detach(), atol=1e-4, rtol=0)


def test_train_loop_with_dropout_runs_unchanged() -> None:
    _, ours = twins(batch_first=True, dropout=0.2)
    result = train_loop(ours, steps=3)
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    for rows in result["rows"]:  # before dropout: every row still sums to 1
        torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("batch_first", [False, True])
def test_eval_loop_and_plotting_under_no_grad_run_unchanged(batch_first: bool) -> None:
    original, ours = twins(batch_first)
    train_loop(original, steps=2), train_loop(ours, steps=2)
    theirs, mine = eval_loop(original), eval_loop(ours)
    torch.testing.assert_close(mine["logits"], theirs["logits"], atol=1e-4, rtol=0)
    assert mine["attn"].shape == (4, HEADS, 6, 6)
    assert_weights_match(mine["attn"], theirs["attn"], atol=1e-5)
    assert isinstance(mine["figure"], Figure) and len(mine["figure"].axes) == HEADS
    # the encoder: against PyTorch's own slow path (the original keeps stale weights where the
    # fused path runs, with batch_first=True)
    src, tgt_in = copy_batch(99)
    reference = slow_path_weights(ours, lambda m: m(src, tgt_in))
    for index, weights in enumerate(mine["encoder"]):
        assert_weights_match(weights, reference[f"encoder.layers.{index}.self_attn"][0])
        if not batch_first:
            assert_weights_match(weights, theirs["encoder"][index])


def test_greedy_decoding_reading_weights_every_step() -> None:
    original, ours = twins(batch_first=True)
    src, _ = copy_batch(7)
    seen = {}
    for name, model in (("original", original), ("ours", ours)):
        model.eval()
        out = torch.full((4, 1), 10)
        with torch.no_grad():
            for _ in range(5):
                logits, attn = model(src, out)
                assert attn.shape == (4, HEADS, out.size(1), out.size(1))
                out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        seen[name] = (out, attn)
    assert torch.equal(seen["ours"][0], seen["original"][0])
    assert_weights_match(seen["ours"][1], seen["original"][1])


def test_the_readme_walkthrough_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's "Seed-compatible layers" walk-through, as written: train, eval + no_grad, plot."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Seed-compatible layers") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from attnscope import TransformerDecoderLayerWithAttn" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        plt.close("all")
    assert (tmp_path / "cross_attention.png").stat().st_size > 0
    model, src, tgt = namespace["model"], namespace["src"][:1], namespace["tgt"][:1]
    reference = slow_path_weights(model, lambda m: m(src, tgt))
    name = "transformer.decoder.layers.1."
    assert_weights_match(namespace["masked"], reference[name + "self_attn"][0])
    assert_weights_match(namespace["cross"], reference[name + "multihead_attn"][0])
    encoder = reference["transformer.encoder.layers.0.self_attn"][0]
    assert_weights_match(namespace["encoder"], encoder)
    # the copy task was learnt: output position t attends to source position t
    assert torch.equal(namespace["cross"][0].mean(0).argmax(-1), torch.arange(8))
