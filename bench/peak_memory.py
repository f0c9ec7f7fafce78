"""Peak memory of a build against its size: does the driver or a worker hold the whole dataset?

Runs ``python -m pipelines.build_dataset`` as a child process for each input size and reads the
child's peak resident set size (``ru_maxrss`` from ``os.wait4``); prints a table and the ratio of
the largest to the smallest. With bounded memory the ratio stays near 1.

    python bench/peak_memory.py --sizes 300 3000 [--config cfg.yaml] [--json out.json]
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


def measure(size: int, config: str | None, workdir: Path, extra: list[str]) -> dict[str, float]:
    """One build of ``synthetic://size``: wall seconds and peak RSS (MiB) of the build process."""
    out = workdir / f"out-{size}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipelines.build_dataset", "--input", f"synthetic://{size}",
               "--output", str(out), *(["--config", config] if config else []), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build of {size} failed:\n{output[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"inputs": size, "written": manifest["counts"]["written"], "wall_s": round(wall, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--config", default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the built datasets")
    args, extra = parser.parse_known_args()
    workdir = Path(tempfile.mkdtemp(prefix="peak-memory-"))
    rows = [measure(size, args.config, workdir, extra) for size in args.sizes]
    print("| inputs | written | wall (s) | peak RSS (MiB) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['inputs']} | {row['written']} | {row['wall_s']} | {row['peak_rss_mib']} |")
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS ratio {rows[-1]['inputs']} vs {rows[0]['inputs']} inputs: {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": round(ratio, 3)}, indent=1))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
