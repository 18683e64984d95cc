"""Train a tiny classifier with optim.Nadam and optim.Adamax, next to torch.optim.

Single process, CPU, a few seconds:

    python examples/optimizer_example.py [--steps 200]

Both of our optimizers are drop-in replacements for torch.optim.NAdam /
torch.optim.Adamax: the losses printed for ours and torch's are identical.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from zerotrain import optim


def make_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals: 2-d points, 2 classes."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen) * 3 * torch.pi
    labels = torch.randint(0, 2, (n,), generator=gen)
    angle = t + labels * torch.pi
    points = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * torch.pi)
    return points + 0.02 * torch.randn(n, 2, generator=gen), labels


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int) -> list[float]:
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation
    torch.manual_seed(0)
    data = make_data()
    template = nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )
    runs = [
        (
            "optim.Nadam",
            lambda p: optim.Nadam(p, lr=1e-2, weight_decay=1e-4, decoupled_weight_decay=True),
        ),
        (
            "torch.optim.NAdam",
            lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-4, decoupled_weight_decay=True),
        ),
        ("optim.Adamax", lambda p: optim.Adamax(p, lr=2e-2)),
        ("torch.optim.Adamax", lambda p: torch.optim.Adamax(p, lr=2e-2)),
    ]
    every = max(1, args.steps // 5)
    for name, make_opt in runs:
        model = copy.deepcopy(template)
        losses = train(model, make_opt(model.parameters()), data, args.steps)
        shown = "  ".join(f"{i + 1}:{losses[i]:.4f}" for i in range(0, args.steps, every))
        accuracy = (model(data[0]).argmax(1) == data[1]).float().mean().item()
        print(f"{name:<20} loss {shown}  final {losses[-1]:.4f}  accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
