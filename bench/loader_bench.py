"""Trainer loader throughput against plain webdataset iteration with image decode, one run.

All read the same shards once, through a torch DataLoader with the same number of workers and
batches of the same number of images:

* plain: ``wds.WebDataset(...).decode("pil").to_tuple("jpg;png")``, images as uint8 tensors,
  batched — the least a loader of these shards does (records read, not returned); the headline
  ratio is against this one;
* plain with records: the same with ``"json"`` too (README, "Loading the shards"): what a
  consumer of the masks and texts starts from;
* trainer: the trainer's stream — record parsing, region choice, RLE decode, letterboxed image
  and masks, region crops and crop masks, tokenized texts, collation.

They are timed alternately (``--repeats`` rounds, best of each); the report gives images/s of
each and the trainer's ratio to both; target ≥ 0.8.

    python -m bench.loader_bench --data out/synth --workers 2
    python -m bench.loader_bench --build 'synthetic://256?size=512'    # build the shards first
    python -m bench.loader_bench --smoke                               # tiny (used in tests)

``--train-steps N`` also times N optimizer steps of the trainer (forward, losses, backward,
AdamW) for ``--model`` on ``--device`` with random weights and reports steps/s (bf16 autocast
on CUDA); e.g. ``--model ViT-B-16 --device cuda --train-steps 30 --batch 64``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

TARGET_RATIO = 0.8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="shards: folder, glob, brace list (default: build with --build)")
    p.add_argument("--build", default="synthetic://256?size=512",
                   help="pipeline input to build shards from when --data is not given")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="model input side")
    p.add_argument("--regions-per-image", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of each loader (best kept)")
    p.add_argument("--model", default="mg-tiny", help="open_clip model for --train-steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--train-steps", type=int, default=0, help="also time this many training steps")
    p.add_argument("--smoke", action="store_true", help="tiny shards, one round, 1 worker")
    p.add_argument("--json", dest="json_out", help="write the report here")
    return p.parse_args(argv)


def _build(spec: str, root: Path) -> Path:
    from pipelines import build_dataset

    cfg = root / "build.yaml"
    cfg.write_text("shards: {samples_per_shard: 32}\nregions: {max_total: 24}\n")
    build_dataset.run(["--input", spec, "--output", str(root / "ds"), "--config", str(cfg), "--workers", "2"])
    return root / "ds"


def plain_batches(urls: list[str], batch: int, records: bool) -> Iterator[list[Any]]:
    """The baseline: webdataset's own decode to PIL, images to uint8 tensors (+ the parsed
    records when ``records``: README's "Loading the shards"), batched."""
    def to_tensor(sample: tuple[Any, ...]) -> Any:
        image = torch.from_numpy(np.array(sample[0].convert("RGB"))).permute(2, 0, 1)   # as pil_to_tensor
        return (image, sample[1]) if records else image

    keys = ("jpg;png", "json") if records else ("jpg;png",)
    return (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                           workersplitter=wds.split_by_worker)
            .decode("pil").to_tuple(*keys).map(to_tensor)
            .batched(batch, collation_fn=list, partial=True))


def _time(loader: Any) -> tuple[int, float]:
    start = time.perf_counter()
    images = sum(len(b["keys"]) if isinstance(b, dict) else len(b) for b in loader)
    return images, time.perf_counter() - start


def loader_figures(urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the three loaders (best of ``repeats``, timed alternately) and the ratios."""
    import open_clip

    from trainer.data import StreamSpec, make_loader
    from trainer.samples import SampleOptions
    from trainer.text import ClipTokenizer

    tokenizer = ClipTokenizer(open_clip.get_tokenizer("ViT-B-16", context_length=248))
    spec = StreamSpec(urls, SampleOptions(args.image_size, args.regions_per_image), args.batch, train=False)
    extra = {"prefetch_factor": 2} if args.workers else {}
    loaders = {
        "plain": lambda: DataLoader(plain_batches(urls, args.batch, False), batch_size=None,
                                    num_workers=args.workers, **extra),
        "plain_records": lambda: DataLoader(plain_batches(urls, args.batch, True), batch_size=None,
                                            num_workers=args.workers, **extra),
        "trainer": lambda: make_loader(spec, tokenizer, args.workers),
    }
    best: dict[str, tuple[int, float]] = {}
    for _ in range(args.repeats):
        for name, make in loaders.items():
            images, seconds = _time(make())
            if name not in best or images / seconds > best[name][0] / best[name][1]:
                best[name] = (images, seconds)
    rate = {name: n / s for name, (n, s) in best.items()}
    ratio = rate["trainer"] / rate["plain"]
    return {"images": best["plain"][0], "trainer_images": best["trainer"][0],
            **{f"{name}_images_per_s": r for name, r in rate.items()},
            "ratio": ratio, "ratio_vs_records": rate["trainer"] / rate["plain_records"],
            "target_ratio": TARGET_RATIO, "met": ratio >= TARGET_RATIO}


def train_figures(urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Optimizer steps/s of the trainer (random weights) on real batches from the shards."""
    from trainer.config import load_config
    from trainer.data import StreamSpec, make_loader, to_device
    from trainer.losses import branch_losses
    from trainer.model import build_model
    from trainer.optim import build_optimizer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(None, [f"model.name={args.model}", f"data.batch_size={args.batch}"])
    model, tokenizer = build_model(cfg)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    from trainer.samples import SampleOptions

    spec = StreamSpec(urls, SampleOptions(model.image_size, args.regions_per_image), args.batch, train=True)
    batches = [b for b in itertools.islice(make_loader(spec, tokenizer, args.workers), 4)]
    bf16 = device.type == "cuda"

    def step(batch: dict[str, Any]) -> float:
        b = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(b)
        scales = {n: model.logit_scale(n) for n in model.logit_scales}
        loss = branch_losses({k: v.float() for k, v in emb.items()}, b["groups"], scales, cfg.loss)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step(batches[0])                                 # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.train_steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    regions = sum(len(b["region_image"]) for b in batches) / len(batches)
    return {"model": args.model, "device": str(device), "precision": "bf16" if bf16 else "fp32",
            "batch_images": args.batch, "regions_per_batch": regions, "steps": args.train_steps,
            "steps_per_s": args.train_steps / seconds,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.workers, args.repeats, args.batch, args.image_size = 1, 1, 4, 64
    from trainer.data import expand_urls

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = args.data
        elif args.smoke:
            from trainer.testing import write_shards

            write_shards(Path(tmp) / "shards", shards=2, per_shard=6, size=96)
            data = str(Path(tmp) / "shards")
        else:
            data = str(_build(args.build, Path(tmp)))
        urls = expand_urls([data])
        report: dict[str, Any] = {"shards": len(urls), "workers": args.workers, "batch": args.batch,
                                  "image_size": args.image_size, "regions_per_image": args.regions_per_image,
                                  "loader": loader_figures(urls, args)}
        if args.train_steps:
            report["train"] = train_figures(urls, args)
    loader = report["loader"]
    print(f"plain webdataset + image decode: {loader['plain_images_per_s']:.1f} images/s")
    print(f"same + parsed records (README's loader): {loader['plain_records_images_per_s']:.1f} images/s")
    print(f"trainer loader (masks, crops, tokens): {loader['trainer_images_per_s']:.1f} images/s")
    print(f"ratio {loader['ratio']:.2f} (target >= {TARGET_RATIO}: {'met' if loader['met'] else 'not met'}); "
          f"vs the loader with records {loader['ratio_vs_records']:.2f}")
    if "train" in report:
        t = report["train"]
        print(f"training: {t['steps_per_s']:.2f} steps/s, {t['model']} {t['precision']} on {t['device']}, "
              f"{t['batch_images']} images + {t['regions_per_batch']:.0f} regions per step")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
