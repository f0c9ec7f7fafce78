"""Images per second of a build with 1 and 2 worker processes (FnApiRunner, multi-process).

Each worker count builds ``synthetic://N`` with the embedded default (``classical`` +
``attributes``) and a tiny run of the same settings; the throughput is the *marginal* one,
(N − n) / (wall(N) − wall(n)), so the runner's start-up (several seconds, more with more
processes) does not count. Speed-up = images/s with 2 workers ÷ with 1. On a machine with fewer
free cores than workers the speed-up cannot reach the worker count; the report says how many
cores the machine has.

    python bench/scaling.py [--images 120] [--size 384] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SPEEDUP = 1.7


def wall(spec: str, workers: int, out: Path, config: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.build_dataset", "--input", spec, "--output", str(out),
                    "--config", str(config), "--workers", str(workers), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--small", type=int, default=8, help="images of the start-up run")
    parser.add_argument("--size", type=int, default=384, help="side of the synthetic scenes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    config = work / "config.yaml"
    # several shards, so two workers have shards to write at the same time
    config.write_text(f"shards: {{samples_per_shard: {max(4, args.images // 8)}}}\n")
    rows = {}
    try:
        for workers in (1, 2):
            small = wall(f"synthetic://{args.small}?size={args.size}", workers, work / "small", config)
            big = wall(f"synthetic://{args.images}?size={args.size}", workers, work / "big", config)
            # noise larger than the work (tiny runs) gives no marginal figure: None
            rate = round((args.images - args.small) / (big - small), 3) if big > small else None
            rows[workers] = {"wall_small_s": round(small, 2), "wall_s": round(big, 2), "images_per_s": rate}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rates = rows[1]["images_per_s"], rows[2]["images_per_s"]
    speedup = round(rates[1] / rates[0], 2) if None not in rates else None
    result = {"images": args.images, "size": args.size, "cores": os.cpu_count(), "workers": rows,
              "speedup": speedup, "target": TARGET_SPEEDUP}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
