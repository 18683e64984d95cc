"""End-to-end runtime throughput: the same job through Ray Train with each sharding engine.

    python bench/runtime_engines.py [--steps 120] [--workers 2] [--out bench/results/runtime_engines.json]

Runs ``examples/regression.yaml`` (a ~3M-parameter MLP, Nadam) on a private local Ray
with: native ZeroOptimizer (all-reduce and reduce-scatter gradient sync) and DeepSpeed
ZeRO stage 1 and 2 with our Nadam as the client optimizer. Same seed, data and steps.
Reports the median samples/s over the metrics windows (the first window, which includes
warm-up, is left out), per-step phase times, optimizer-state bytes per rank, final
loss, and the wall time of ``TorchTrainer.fit()`` (fixed Ray Train costs included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "native all_reduce": {"engine": "native", "stage": 2, "grad_sync": "all_reduce"},
    "native reduce_scatter": {"engine": "native", "stage": 2, "grad_sync": "reduce_scatter"},
    "deepspeed stage 1": {"engine": "deepspeed", "stage": 1, "grad_sync": "auto"},
    "deepspeed stage 2": {"engine": "deepspeed", "stage": 2, "grad_sync": "auto"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime_engines.json"))
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    import yaml

    from zerotrain.service.runtime.trainer import run_job
    from zerotrain.service.spec import JobSpec

    base = yaml.safe_load((ROOT / "examples" / "regression.yaml").read_text())
    base["training"].update(
        max_steps=args.steps, metrics_every=max(1, args.steps // 6), checkpoint_every=0
    )
    base["scaling"]["num_workers"] = args.workers

    temp = Path(tempfile.mkdtemp(prefix="zt-bench-"))
    ray.init(num_cpus=args.workers + 1, _temp_dir=str(temp / "ray"), include_dashboard=False)
    rows = []
    try:
        for name, sharding in VARIANTS.items():
            data = json.loads(json.dumps(base))
            data["sharding"].update(sharding)
            spec = JobSpec.from_dict(data)
            metrics = temp / f"{name.replace(' ', '-')}.jsonl"
            start = time.perf_counter()
            result = run_job(
                spec,
                job_id=name.replace(" ", "-"),
                storage=temp / "runs",
                metrics_file=str(metrics),
            )
            wall = time.perf_counter() - start
            if result.error is not None:
                raise SystemExit(f"{name} failed: {result.error}")
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            steady = records[1:] or records
            phases = {
                phase: statistics.median(r["phase_seconds"][phase] for r in steady) * 1e3
                for phase in steady[0]["phase_seconds"]
            }
            rows.append(
                {
                    "variant": name,
                    "samples_per_second": statistics.median(
                        r["samples_per_second"] for r in steady
                    ),
                    "phase_ms": phases,
                    "state_bytes_per_rank": records[-1]["state_bytes_per_rank"],
                    "final_loss": records[-1]["loss"],
                    "eval_mse": records[-1].get("eval_mse"),
                    "fit_seconds": wall,
                }
            )
            print(f"{name}: {rows[-1]['samples_per_second']:.0f} samples/s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    header = "| variant | samples/s | data / fwd / bwd / opt ms per step | state bytes/rank | final loss | fit s |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["phase_ms"]
        lines.append(
            f"| {r['variant']} | {r['samples_per_second']:.0f} | "
            f"{p['data']:.2f} / {p['forward']:.1f} / {p['backward']:.1f} / {p['optimizer']:.1f} | "
            f"{max(r['state_bytes_per_rank']):,} | {r['final_loss']:.5f} | {r['fit_seconds']:.0f} |"
        )
    print("\n".join(lines))
    out = {
        "benchmark": "runtime_engines",
        "steps": args.steps,
        "workers": args.workers,
        "spec": base,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": os.getloadavg()[0],
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
