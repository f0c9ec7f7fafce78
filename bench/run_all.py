"""``make bench``: the CPU benchmarks in one run, a table of figure / target / measured / met, and
``bench/results/latest.json``.

Each benchmark is its own script (run it alone for more options); this runs them one after the
other as child processes, so each measures a fresh interpreter, and collects their JSON reports.
Ratios are measured within one benchmark run (the machine may be shared and noisy); absolute times
are for orientation. GPU figures come from ``bench/gpu.sh`` on a CUDA machine, never from here.

    python bench/run_all.py                  # ~10 minutes on 2 cores
    python bench/run_all.py --only prompts overhead
    python bench/run_all.py --smoke          # tiny inputs: proves every benchmark runs (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "7c31e11c4121baa406a661d39b852f2afd209fac"   # the commit before the CPU-budget work


def _run(script: str, args: list[str], out: Path) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    report["_wall_s"] = round(time.perf_counter() - start, 1)
    return report


def overhead(work: Path, smoke: bool) -> list[dict[str, Any]]:
    out = work / "overhead.json"
    sizes, repeat = (["4", "12"], "1") if smoke else (["100", "1000"], "3")
    r = _run("pipeline_overhead.py", ["--sizes", *sizes, "--repeat", repeat, "--json", str(out)], out)
    by_repeat = ", ".join("-" if x is None else f"{x}x" for x in r["ratio_by_repeat"])
    return [_row("P1 pipeline cost / minimal image loop (given masks, no captions, marginal per image)",
                 "<= 1.5x", r["ratio"], r["ratio"] <= 1.5, "x",
                 f"{r['marginal_pipeline_ms']} vs {r['marginal_baseline_ms']} ms/image (OpenCV on one thread, "
                 f"as img2dataset), sizes {' vs '.join(sizes)}, fastest of {repeat}; each repetition alone: "
                 f"{by_repeat}; against OpenCV's default threads "
                 f"({r['marginal_baseline_cv2_threads_ms']} ms/image) {r['ratio_cv2_threads']}x")]


def prompts(work: Path, smoke: bool) -> list[dict[str, Any]]:
    out, legacy_out = work / "prompts.json", work / "prompts-legacy.json"
    extra = ["--smoke"] if smoke else []
    r = _run("prompt_bench.py", [*extra, "--json", str(out)], out)
    old = _run("prompt_bench.py", [*(extra or ["--repeat", "1", "--masks", "2"]), "--mode", "legacy",
                                   "--json", str(legacy_out)], legacy_out)
    rows = [_row("P1b visual prompt, drawn + encoded (worst kind, CPU ms per region)", "<= 12 ms",
                 r["worst_cpu_ms"], r["met"], "ms",
                 ", ".join(f"{k} {v['cpu_ms']:.1f}" for k, v in sorted(r["kinds"].items())))]
    ratios = {name: old["requests"][name] / r["requests"][name] for name in r["requests"]
              if name in old["requests"] and r["requests"][name]}
    if ratios:
        rows.append(_row("P1b image bytes per region request, before / after (smallest over programs)",
                         "smaller", round(min(ratios.values()), 2), min(ratios.values()) > 1, "x",
                         ", ".join(f"{k} {v:.1f}x" for k, v in sorted(ratios.items()))))
    return rows


def memory(work: Path, smoke: bool) -> list[dict[str, Any]]:
    out = work / "memory.json"
    config = work / "memory.yaml"
    config.write_text("segmenter: {name: given}\ncaptioner: {name: none}\n")
    sizes = ["4", "40"] if smoke else ["300", "3000"]
    r = _run("peak_memory.py", ["--sizes", *sizes, "--config", str(config), "--json", str(out)], out)
    return [_row(f"P2 peak RSS, synthetic://{sizes[1]} / synthetic://{sizes[0]} (given masks, no captions)",
                 "<= 1.2x", r["ratio"], r["ratio"] <= 1.2, "x",
                 ", ".join(f"{row['inputs']}: {row['peak_rss_mib']} MiB" for row in r["rows"]))]


def embedded(work: Path, smoke: bool) -> list[dict[str, Any]]:
    out = work / "embedded.json"
    args = ["--smoke"] if smoke else ["--repeat", "2", "--git-rev", BASELINE]
    r = _run("embedded_default.py", [*args, "--json", str(out)], out)
    mean = r["mean"]
    if "speedup" not in r:
        return [_row("Embedded default, seconds per image (classical + attributes)", "—",
                     round(mean["total_s"], 4), None, "s", "smoke: no baseline run")]
    speedup = r["speedup"]["total"]
    return [_row(f"Embedded default speed-up vs {BASELINE[:7]} (bundled photos, per image)", ">= 5x",
                 round(speedup, 2), speedup >= 5.0, "x",
                 f"{r['baseline']['mean']['total_s']:.3f} -> {mean['total_s']:.3f} s/image")]


def client(work: Path, smoke: bool) -> list[dict[str, Any]]:
    out = work / "client.json"
    args = ["--smoke"] if smoke else ["--requests", "5000", "--in-flight", "256", "--latency-ms", "100"]
    r = _run("caption_client_bench.py", [*args, *([] if smoke else ["--repeat", "3"]),
                                         "--baseline-aiohttp", "--json", str(out)], out)
    # the same load through the aiohttp transports, and with answers spread over 50-150 ms (no
    # lockstep waves of 256 answers in the same millisecond): rendering measured once is enough
    quick = ["--render-repeat", "1", "--render-masks", "1"]
    other = {}
    for name, extra in (("direct", ["--transport", "direct"]), ("sdk", ["--transport", "aiohttp"]),
                        ("spread", ["--jitter", "0.5"])):
        other[name] = _run("caption_client_bench.py", [*args, *quick, *extra, "--json", str(work / f"client-{name}.json")],
                           work / f"client-{name}.json")
    direct, sdk, spread = other["direct"], other["sdk"], other["spread"]
    runs = ", ".join(str(e) for e in r["efficiency_runs"])
    rows = [_row("P3 caption client throughput, share of ideal (256 in flight, 100 ms server)", ">= 0.90",
                 r["efficiency"], r["met"]["efficiency"], "",
                 f"{r.get('requests', '')} requests, transport {r['transport']} (default), fastest of "
                 f"{len(r['efficiency_runs'])} runs ({runs}), {r['server']} server "
                 f"({r['server_cpu_per_request_ms']} ms CPU/request); latency 50-150 ms: {spread['efficiency']}; "
                 f"aiohttp transports: direct {direct['efficiency']}, SDK {sdk['efficiency']}; a bare aiohttp "
                 f"loop, same server: {round(r['baseline_aiohttp']['rps'] / r['ideal_rps'], 4)}"),
            _row("P3 caption client CPU per request (without prompt rendering)", "<= 1 ms",
                 r["cpu_per_request_ms"], r["met"]["cpu_per_request_ms"], "ms",
                 f"transport {r['transport']}; direct {direct['cpu_per_request_ms']} ms; SDK "
                 f"{sdk['cpu_per_request_ms']} ms; bare aiohttp loop "
                 f"{round(r['baseline_aiohttp']['cpu_per_request_ms'], 3)} ms")]
    render = r.get("render_ms_per_region_request")
    if render is not None:
        rows.append(_row("P3 client + prompt rendering CPU per region request", "<= 13 ms",
                         round(r["cpu_per_request_ms"] + render, 3),
                         r["cpu_per_request_ms"] + render <= 13.0, "ms", f"rendering {render} ms"))
    return rows


def scaling(work: Path, smoke: bool) -> list[dict[str, Any]]:
    out = work / "scaling.json"
    args = ["--images", "24", "--small", "2", "--size", "96"] if smoke else []
    r = _run("scaling.py", [*args, "--json", str(out)], out)
    return [_row(f"Embedded default, 2 worker processes / 1 ({r['cores']} cores)", ">= 1.7x",
                 r["speedup"], None if r["speedup"] is None else r["speedup"] >= 1.7, "x",
                 f"{r['workers']['1']['images_per_s']} -> {r['workers']['2']['images_per_s']} images/s")]


def _row(figure: str, target: str, measured: Any, met: bool | None, unit: str, note: str) -> dict[str, Any]:
    return {"figure": figure, "target": target, "measured": measured, "unit": unit, "met": met, "note": note}


BENCHES: dict[str, Callable[[Path, bool], list[dict[str, Any]]]] = {
    "overhead": overhead, "prompts": prompts, "memory": memory, "embedded": embedded, "client": client,
    "scaling": scaling}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| figure | target | measured | met |", "|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "—"}[row["met"]]
        measured = f"{row['measured']}{row['unit'] if row['unit'] in ('x', 'ms', 's') else ''}"
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['figure']} | {row['target']} | {measured}{note} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny inputs; proves each benchmark runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()
    names = args.only or list(BENCHES)
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                rows += BENCHES[name](Path(tmp), args.smoke)
            except Exception as exc:   # one broken benchmark still leaves the others' figures
                errors[name] = str(exc)[-3000:]
                print(f"{name} failed: {exc}", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "commit": commit, "smoke": args.smoke, "rows": rows, "errors": errors,
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; wrote {args.out}")
    if errors:
        raise SystemExit(f"failed: {', '.join(errors)}")


if __name__ == "__main__":
    main()
