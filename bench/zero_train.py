"""Sharded data-parallel training benchmark: ZeroOptimizer vs DDP, torch ZeRO and DeepSpeed.

Every variant trains the same GPT-like model (>= 10M parameters) with Nadam on
the same data, seed and steps, on 2 CPU ranks over gloo, each variant in its own
freshly spawned process group (so peak RSS is per variant):

* ``zero-<sync>-<overlap>[-compile]``: ``optim.ZeroOptimizer`` (no DDP wrapper),
  each ``grad_sync`` mode with overlap on and off, eager (its defaults) and with
  the fused ``compile=True`` step;
* ``ddp``: ``DistributedDataParallel`` + ``torch.optim.NAdam``;
* ``torch-zero``: ``DistributedDataParallel`` + torch's ``ZeroRedundancyOptimizer``;
* ``deepspeed-z1`` / ``deepspeed-z2``: DeepSpeed ZeRO stage 1 / 2 with
  ``optim.Nadam`` as its client optimizer (``DS_ACCELERATOR=cpu``,
  ``zero_allow_untested_optimizer``, ``gradient_clipping: 0``).

Reported per variant: the median step time over every measured step of every
round (``--rounds`` x ``--steps``, at least 30 by default) and samples/s from it,
its speed relative to DDP (pooled, and the median of the per-round ratios, which a
machine whose speed drifts over minutes disturbs less),
optimizer-state bytes per rank (one definition for every optimizer:
``zerotrain.service.runtime.engines.optimizer_state_bytes``, moments and master copies,
DeepSpeed's fp32 partition included), peak RSS per rank, and the final loss
(which must agree across variants). For ZeroOptimizer also the gradient bytes a
rank holds (``ZeroOptimizer.grad_bytes``) right after backward and between
steps: reduce-scatter (ZeRO-2) frees all but the reduced 1/N slice. The rounds
interleave the variants, alternating their order, so a change of load on a
shared machine hits all of them alike.

    .venv/bin/python bench/zero_train.py [--steps 10] [--rounds 3] [--variants ...]

Writes a table to stdout and ``bench/results/zero_train.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

LOAD_AT_START = os.getloadavg()

VARIANTS = [
    "zero-all_reduce-overlap",
    "zero-all_reduce-no_overlap",
    "zero-reduce_scatter-overlap",
    "zero-reduce_scatter-no_overlap",
    "zero-all_reduce-overlap-compile",
    "zero-all_reduce-no_overlap-compile",
    "zero-reduce_scatter-overlap-compile",
    "ddp",
    "torch-zero",
    "deepspeed-z1",
    "deepspeed-z2",
]


# ------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, pre-LN blocks, untied head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_batch(step: int, rank: int, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of an affine recurrence mod vocab (learnable), seeded by (step, rank)."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    b, t, v = cfg["batch"], cfg["context"] + 1, cfg["vocab"]
    start = torch.randint(0, v, (b, 1), generator=g)
    mult = torch.randint(1, 8, (b, 1), generator=g)
    seq = (start + mult * torch.arange(t)) % v
    return seq[:, :-1], seq[:, 1:]


# ---------------------------------------------------------------- variants


def _build(variant: str, model: nn.Module, cfg: dict):
    """Return (forward_backward(tokens, targets) -> loss, step(), state_bytes(), grad_bytes).

    ``grad_bytes`` is a function (ZeroOptimizer) or None (not measured).
    """
    from zerotrain.optim import Nadam, ZeroOptimizer
    from zerotrain.service.runtime.engines import optimizer_state_bytes

    lr = cfg["lr"]
    if variant.startswith("zero-"):
        _, sync, ov, *extra = variant.split("-")
        opt = ZeroOptimizer(model.parameters(), Nadam, grad_sync=sync, overlap=ov == "overlap",
                            compile="compile" in extra, lr=lr)  # fmt: skip

        def fwd_bwd(x, y):
            loss = model(x, y)
            loss.backward()
            return loss

        def step():
            opt.step()
            opt.zero_grad()

        return fwd_bwd, step, opt.state_bytes, opt.grad_bytes
    if variant in ("ddp", "torch-zero"):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, bucket_cap_mb=25)
        if variant == "ddp":
            opt = torch.optim.NAdam(model.parameters(), lr=lr)
            state = lambda: optimizer_state_bytes(dict(opt.state))  # noqa: E731
        else:
            opt = ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=torch.optim.NAdam, lr=lr
            )
            state = lambda: optimizer_state_bytes(dict(opt.optim.state))  # noqa: E731

        def fwd_bwd(x, y):
            loss = ddp(x, y)
            loss.backward()
            return loss

        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)

        return fwd_bwd, step, state, None
    if variant.startswith("deepspeed-z"):
        import deepspeed

        stage = int(variant[-1])
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg["batch"],
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg["batch"] * dist.get_world_size(),
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {
                "stage": stage,
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": 25 * 2**20 // 4,
                "allgather_bucket_size": 25 * 2**20 // 4,
            },
        }
        client = Nadam(model.parameters(), lr=lr)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client, config=ds_config
        )

        def fwd_bwd(x, y):
            loss = engine(x, y)
            engine.backward(loss)
            return loss

        def state():
            masters = getattr(optimizer, "single_partition_of_fp32_groups", [])
            return optimizer_state_bytes(dict(optimizer.optimizer.state), list(masters))

        return fwd_bwd, engine.step, state, None
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def _worker(rank: int, world_size: int, store_path: str, variant: str, cfg: dict, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
    )  # fmt: skip
    torch.set_num_threads(cfg["threads"])
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    torch.manual_seed(cfg["seed"])
    model = GPT(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["context"])
    n_params = sum(p.numel() for p in model.parameters())
    fwd_bwd, step, state_bytes, grad_bytes = _build(variant, model, cfg)
    times, losses = [], []
    grad_after_backward = grad_between_steps = 0
    for i in range(cfg["warmup"] + cfg["steps"]):
        x, y = make_batch(i, rank, cfg)
        dist.barrier()
        t0 = time.perf_counter()
        loss = fwd_bwd(x, y)
        if grad_bytes is not None:  # a sum over a few storages: negligible inside the timing
            grad_after_backward = max(grad_after_backward, grad_bytes())
        step()
        if grad_bytes is not None:
            grad_between_steps = max(grad_between_steps, grad_bytes())
        dist.barrier()
        times.append(time.perf_counter() - t0)
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        losses.append(float(mean_loss) / world_size)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [None] * world_size
    dist.all_gather_object(
        rows,
        {
            "rss_bytes": rss_kib * 1024,
            "state_bytes": int(state_bytes()),
            "grad_after_backward": grad_after_backward,
            "grad_between_steps": grad_between_steps,
        },
    )
    if rank == 0:
        measured = times[cfg["warmup"] :]
        result = {
            "variant": variant,
            "params": n_params,
            "step_s": measured,
            "state_bytes_per_rank": [r["state_bytes"] for r in rows],
            "peak_rss_bytes_per_rank": [r["rss_bytes"] for r in rows],
            "grad_bytes_after_backward_per_rank": (
                [r["grad_after_backward"] for r in rows] if grad_bytes is not None else None
            ),
            "grad_bytes_between_steps_per_rank": (
                [r["grad_between_steps"] for r in rows] if grad_bytes is not None else None
            ),
            "losses": losses,
            "final_loss": losses[-1],
        }
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_variant(variant: str, cfg: dict, world_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(
            _worker,
            args=(world_size, os.path.join(tmp, "store"), variant, cfg, out),
            nprocs=world_size,
            start_method="spawn",
        )
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "zero_train.json"))
    args = parser.parse_args()
    cfg = {
        "vocab": 4096, "dim": args.dim, "layers": args.layers, "heads": 8,
        "context": args.context, "batch": args.batch, "lr": 1e-3, "seed": 0,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
    }  # fmt: skip
    # Rounds interleave the variants, alternating their order; each variant's steps of
    # every round are pooled and the median step time reported.
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.rounds):
        order = args.variants if round_ % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            t0 = time.time()
            runs[variant].append(run_variant(variant, cfg, args.world_size))
            print(f"# round {round_}: {variant} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    results = []
    for variant in args.variants:
        rounds = runs[variant]
        steps = sorted(t for r in rounds for t in r["step_s"])
        result = dict(rounds[-1])  # memory and loss: the same every round
        result["step_s"] = [r["step_s"] for r in rounds]
        result["measured_steps"] = len(steps)
        result["step_s_median"] = statistics.median(steps)
        result["step_s_p10_p90"] = [steps[len(steps) // 10], steps[(9 * len(steps)) // 10]]
        result["samples_per_s"] = cfg["batch"] * args.world_size / result["step_s_median"]
        results.append(result)
    if "ddp" in runs:  # this machine's speed drifts over minutes: compare within each round
        for result in results:
            ratios = [
                statistics.median(d["step_s"]) / statistics.median(r["step_s"])
                for r, d in zip(runs[result["variant"]], runs["ddp"], strict=True)
            ]
            result["x_ddp_per_round"] = ratios
            result["x_ddp_median_of_rounds"] = statistics.median(ratios)
    report(results, cfg, args)


def report(results: list[dict], cfg: dict, args: argparse.Namespace) -> None:
    by = {r["variant"]: r for r in results}
    base_state = by.get("ddp", {}).get("state_bytes_per_rank", [None])[0]
    finals = [r["final_loss"] for r in results]
    spread = (max(finals) - min(finals)) / abs(min(finals))
    header = (
        f"{'variant':36} {'ms/step':>8} {'samples/s':>10} {'vs ddp':>7} {'rounds':>7} "
        f"{'state MiB/rank':>15} "
        f"{'vs torch.optim':>15} {'peak RSS MiB/rank':>18} {'grad MiB bwd/between':>21} "
        f"{'final loss':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ddp = by.get("ddp")
        speed = r["samples_per_s"] / ddp["samples_per_s"] if ddp else math.nan
        state = max(r["state_bytes_per_rank"])
        ratio = state / base_state if base_state else math.nan
        rss = "/".join(f"{b / 2**20:.0f}" for b in r["peak_rss_bytes_per_rank"])
        grads = "-"
        if r.get("grad_bytes_after_backward_per_rank"):
            bwd = max(r["grad_bytes_after_backward_per_rank"]) / 2**20
            between = max(r["grad_bytes_between_steps_per_rank"]) / 2**20
            grads = f"{bwd:.1f}/{between:.1f}"
        print(
            f"{r['variant']:36} {r['step_s_median'] * 1e3:8.1f} {r['samples_per_s']:10.2f} "
            f"{speed:7.2f} {r.get('x_ddp_median_of_rounds', math.nan):7.2f} {state / 2**20:15.2f} "
            f"{ratio:15.3f} {rss:>18} {grads:>21} {r['final_loss']:11.6f}"
        )
    print(f"\nparams: {results[0]['params']:,}; final-loss relative spread: {spread:.2e}")
    machine = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": LOAD_AT_START,
        "loadavg_at_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([".venv/bin/python", "bench/zero_train.py", *sys.argv[1:]]),
        "config": cfg,
        "world_size": args.world_size,
        "machine": machine,
        "final_loss_relative_spread": spread,
        "results": results,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
