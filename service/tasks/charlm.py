"""``charlm``: a small causal transformer over bytes of the Python standard library's sources.

The corpus is the interpreter's own top-level ``*.py`` files, read in sorted
order and cut at ``max_chars`` bytes: offline and deterministic for a given
Python version (all workers of a Ray cluster run the same one).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zerotrain.service.tasks.base import Task, init_module, seeded_generator

__all__ = ["CharTransformer", "WindowDataset", "build", "load_corpus"]

VOCAB_SIZE = 256  # bytes


def load_corpus(name: str, max_chars: int) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of at most ``max_chars`` bytes."""
    if name != "stdlib":
        raise ValueError(f"task_args.corpus: unknown corpus {name!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_chars:
            break
    corpus = b"".join(chunks)[:max_chars]
    if len(corpus) < 10_000:
        raise RuntimeError(f"standard library sources not found under {root}")
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


class WindowDataset:
    """Sample ``i`` is the window ``text[i : i + context]`` and its next-byte targets."""

    def __init__(self, text: torch.Tensor, context: int):
        self.text = text.long()
        self.context = context

    def __len__(self) -> int:
        return len(self.text) - self.context

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both ``[len(indices), context]`` int64."""
        offsets = indices[:, None] + torch.arange(self.context + 1)
        windows = self.text[offsets]
        return windows[:, :-1], windows[:, 1:]


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # [b, t, 3d] -> 3 x [b, heads, t, d/heads]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A GPT-style byte-level language model: ``[b, t]`` bytes -> ``[b, t, 256]`` logits."""

    def __init__(self, *, context: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build(args: dict[str, Any], *, seed: int) -> Task:
    """Build the charlm task: the last 10% of the corpus is held out for ``eval_bits_per_byte``."""
    text = load_corpus(args["corpus"], args["max_chars"])
    split = int(len(text) * 0.9)
    context = args["context"]
    train, held_out = WindowDataset(text[:split], context), WindowDataset(text[split:], context)
    # A fixed, evenly spaced set of held-out windows keeps evaluation cheap and comparable.
    eval_idx = torch.linspace(0, len(held_out) - 1, steps=min(64, len(held_out))).long()
    eval_inputs, eval_targets = held_out.batch(eval_idx)

    model = CharTransformer(
        context=context, d_model=args["d_model"], n_layers=args["n_layers"], n_heads=args["n_heads"]
    )
    init_module(model, seeded_generator(seed, stream=1))

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        loss = _lm_loss(m(eval_inputs), eval_targets).item()
        return {"eval_loss": loss, "eval_bits_per_byte": loss / math.log(2)}

    return Task(
        model=model,
        train=train,
        loss=_lm_loss,
        evaluate=evaluate,
        kind="language_model",
        info={"corpus_bytes": len(text), "train_samples": len(train)},
    )
