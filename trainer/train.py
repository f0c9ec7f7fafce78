"""Train RegionCLIP on the shards: ``python -m trainer.train --data SHARDS --config YAML --output DIR``.

One process, or one per GPU / CPU slot under ``torchrun`` (DDP: NCCL on CUDA, gloo on CPU). The
batch size in the config is the global one, so a config means the same experiment on any number
of processes. Rerunning the same command resumes from the last checkpoint in OUTPUT.

Outputs (rank 0): config.yaml, run.json, metrics.jsonl (one row per step), checkpoints/,
model.safetensors, eval.json, loss_curve.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import checkpoint, distributed, report
from trainer.config import ConfigError, TrainerConfig, load_config, save_config
from trainer.data import DataPosition, StreamSpec, expand_urls, make_loader, split_holdout, to_device
from trainer.evaluate import evaluate
from trainer.losses import branch_losses
from trainer.model import RegionCLIP, build_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.samples import SampleOptions
from trainer.text import Tokenizer

log = logging.getLogger("trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", help="training shards: dirs, paths, globs, {a..b} lists, URLs")
    p.add_argument("--eval-data", nargs="+", help="held-out shards (default: data.holdout_shards)")
    p.add_argument("--config", help="YAML config (defaults otherwise)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.batch_size=64 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto (latest checkpoint in OUTPUT, if any) | none | a checkpoint folder")
    p.add_argument("--stop-at-step", type=int,
                   help="checkpoint and stop after this step (time-sliced jobs); rerun to continue")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainerConfig:
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.train={json.dumps(args.data)}")
    if args.eval_data:
        overrides.append(f"data.eval={json.dumps(args.eval_data)}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards (give --data or data.train)")
    return cfg


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        name = f"cuda:{info.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything one training process holds."""

    cfg: TrainerConfig
    out: Path
    device: torch.device
    info: distributed.DistInfo
    model: RegionCLIP
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    position: DataPosition
    eval_urls: list[str]
    step: int = 0
    images_seen: int = 0
    forward: nn.Module = field(init=False)
    stop_requested: bool = False

    def __post_init__(self) -> None:
        self.forward = self.model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (normalisation constants, causal mask) never change: no per-step broadcast
            self.forward = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)

    def autocast(self) -> AbstractContextManager:
        precision = self.cfg.train.precision
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def sample_options(self, regions_per_image: int) -> SampleOptions:
        d = self.cfg.data
        return SampleOptions(self.model.image_size, regions_per_image, tuple(d.levels), d.min_region_frac,
                             d.crop_context, self.cfg.train.seed, self.cfg.loss.image.tags)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return to_device(batch, self.device)

    def save(self) -> Path | None:
        """Checkpoint now (every process takes part in merging the data position)."""
        states = distributed.all_gather_objects(self.position.run_state())
        if not self.info.main:
            return None
        path = checkpoint.save(self.out, self.step, self.model, self.optimizer, self.scheduler,
                               self.position.merged_state(states), self.cfg, self.cfg.train.keep_checkpoints,
                               {"world_size": self.info.world, "images_seen": self.images_seen})
        log.info("checkpoint %s", path)
        return path


def _per_process_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    """``x`` with its gradient divided by ``world`` (value unchanged).

    A temperature enters every process's copy of the global loss in full, so each process would
    add the whole gradient; dividing makes the sum over processes the full-batch gradient.
    """
    return x if world == 1 else x.detach() + (x - x.detach()) / world


def train_step(run: Run, batch: dict[str, Any]) -> dict[str, Any]:
    """Forward, gather the global batch, losses, backward, clip, step."""
    b = run.to_device(batch)
    with run.autocast():
        emb = run.forward(b)
    emb = {k: distributed.gather(v.float()) for k, v in emb.items()}
    groups = {k: distributed.gather(v) for k, v in b["groups"].items()}
    world = run.info.world
    scales = {name: _per_process_grad(run.model.logit_scale(name), world) for name in run.model.logit_scales}
    losses = branch_losses(emb, groups, scales, run.cfg.loss)
    run.optimizer.zero_grad(set_to_none=True)
    # Every process holds the loss of the whole global batch, with gradient only through its own
    # rows; DDP averages gradients, so scaling by the world size gives the full-batch gradient.
    (losses["total"] * world).backward()
    clip = run.cfg.optim.grad_clip
    params = [p for p in run.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    row = {"loss": losses["total"].detach().item()}
    row.update({f"loss/{k}": v.detach().item() for k, v in losses.items() if k != "total"})
    row["grad_norm"] = norm.item()
    row.update({f"temperature/{k}": 1 / v.detach().item() for k, v in scales.items()})
    counts = distributed.sum_ints([len(batch["keys"]), batch["n_pixel"], batch["n_box"]], run.device)
    row.update(images=counts[0], pixel_regions=counts[1], box_regions=counts[2])
    return row


def run_eval(run: Run) -> dict[str, Any]:
    """Held-out retrieval on rank 0 (others wait)."""
    result: dict[str, Any] = {}
    if run.info.main and run.eval_urls:
        c = run.cfg
        spec = StreamSpec(run.eval_urls, run.sample_options(c.eval.regions_per_image), c.eval.batch_size,
                          train=False, seed=c.train.seed, max_consecutive_errors=c.data.max_consecutive_errors)
        loader = make_loader(spec, run.tokenizer, min(c.data.workers, len(run.eval_urls)))
        batches = _limit_images(loader, c.eval.max_images)
        result = {"step": run.step, "shards": len(run.eval_urls),
                  **evaluate(run.model, batches, run.to_device, run.autocast())}
    distributed.barrier()
    return result


def _limit_images(batches: Any, max_images: int) -> Any:
    seen = 0
    for batch in batches:
        if max_images and seen >= max_images:
            return
        seen += len(batch["keys"])
        yield batch


def _summary(result: dict[str, Any]) -> str:
    parts = []
    for name in ("region_to_text", "text_to_region", "image_to_text", "crop_to_caption"):
        if name in result:
            r = result[name]
            parts.append(f"{name} R@1 {r['recall@1']:.3f} (chance {r['chance@1']:.3f}, "
                         f"{r['ratio@1']:.1f}x, {r['candidates']} candidates)")
    return "; ".join(parts) or "no held-out data"


# --------------------------------------------------------------------------- setup

def setup_logging(info: distributed.DistInfo) -> None:
    """Progress from rank 0; warnings from every rank (libraries' info lines stay quiet)."""
    where = f" [rank {info.rank}]" if info.enabled else ""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True, datefmt="%H:%M:%S",
                        format=f"%(asctime)s{where} %(levelname)s %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO if info.main else logging.WARNING)


def _check_resume_config(saved: Path, cfg: TrainerConfig) -> None:
    old = load_config(saved).to_dict()
    new = cfg.to_dict()
    if old["model"] != new["model"]:
        raise ConfigError(f"model settings differ from the checkpoint's ({saved}); "
                          "use a new --output or --resume none")
    changed = [k for k in new if k != "model" and old[k] != new[k]]
    if changed:
        log.warning("resuming with changed settings in: %s", ", ".join(changed))


def prepare(args: argparse.Namespace, cfg: TrainerConfig, info: distributed.DistInfo) -> Run:
    """Model, optimizer, data position; restored from a checkpoint when resuming."""
    out = Path(args.output)
    device = resolve_device(args.device, info)
    per_process = cfg.data.batch_size // info.world
    if per_process * info.world != cfg.data.batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by {info.world} processes")
    urls = expand_urls(cfg.data.train)
    eval_urls = expand_urls(cfg.data.eval) if cfg.data.eval else []
    if not cfg.data.eval:
        urls, eval_urls = split_holdout(urls, cfg.data.holdout_shards)
    elif set(urls) & set(eval_urls):
        log.warning("%d evaluation shards are also training shards: the figures are not held-out",
                    len(set(urls) & set(eval_urls)))
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = build_model(cfg)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    position = DataPosition(urls)
    step = images_seen = 0
    ckpt = None if args.resume == "none" else (checkpoint.latest(out) if args.resume == "auto"
                                               else Path(args.resume))
    if args.resume == "none" and checkpoint.latest(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; resume (--resume auto) or use a new --output")
    if ckpt is not None:
        _check_resume_config(ckpt / "config.yaml", cfg)
        state = checkpoint.load(ckpt, model, optimizer, scheduler)
        step, position = state["step"], DataPosition.from_state(state["data"], urls)
        images_seen = state.get("images_seen", 0)
        log.info("resumed from %s at step %d (%d images seen, %d epochs complete)", ckpt, step,
                 images_seen, position.start_epoch)
    run = Run(cfg, out, device, info, model, tokenizer, optimizer, scheduler, position, eval_urls, step,
              images_seen)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        report.truncate_metrics(out / "metrics.jsonl", step)
        _write_run_info(run, urls, per_process)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, %dpx input, text %s; %d training shards, %d held out; "
             "%d process(es) × %d images/step on %s", cfg.model.name, n_params / 1e6, model.image_size,
             cfg.model.text.encoder, len(urls), len(eval_urls), info.world, per_process, device)
    return run


def _write_run_info(run: Run, urls: list[str], per_process: int) -> None:
    import open_clip

    info = {"world_size": run.info.world, "device": str(run.device), "per_process_batch": per_process,
            "train_shards": urls, "eval_shards": run.eval_urls, "argv": sys.argv,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "open_clip": open_clip.__version__}}
    (run.out / "run.json").write_text(json.dumps(info, indent=1))


# --------------------------------------------------------------------------- loop

def train(run: Run, stop_at: int | None = None) -> bool:
    """Steps until train.steps (or ``stop_at``, or SIGTERM); True when the run is complete."""
    c = run.cfg
    spec = StreamSpec(run.position.urls, run.sample_options(c.data.regions_per_image),
                      c.data.batch_size // run.info.world, train=True, seed=c.train.seed,
                      shuffle_buffer=c.data.shuffle_buffer, max_consecutive_errors=c.data.max_consecutive_errors,
                      **run.position.stream_args())
    loader = make_loader(spec, run.tokenizer, c.data.workers, c.data.prefetch, run.device.type == "cuda")
    metrics = (run.out / "metrics.jsonl").open("a") if run.info.main else None
    start, steps, last = time.time(), c.train.steps, run.step
    batches = iter(loader)
    run.model.train()
    try:
        while run.step < steps:
            t0 = time.time()
            batch = next(batches)
            t1 = time.time()
            row = train_step(run, batch)
            run.step += 1
            run.images_seen += row["images"]
            run.position.update(batch)
            row = _row(run, row, t1 - t0, time.time() - t1)
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if run.step % c.train.log_every == 0 or run.step in (1, steps):
                    done = run.step - last
                    eta = (time.time() - start) / max(done, 1) * (steps - run.step)
                    log.info(report.progress_line(row, steps, eta))
            if c.train.eval_every and run.step % c.train.eval_every == 0 and run.step < steps:
                result = run_eval(run)
                if metrics is not None and result:
                    metrics.write(json.dumps({"step": run.step, "eval": result}) + "\n")
                    log.info("eval at step %d: %s", run.step, _summary(result))
            stop = distributed.any_true(run.stop_requested or run.step == stop_at, run.device)
            if run.step % c.train.checkpoint_every == 0 or run.step == steps or stop:
                run.save()
            if stop:
                log.info("stopped at step %d; run the same command again to resume", run.step)
                return False
    finally:
        if metrics is not None:
            metrics.close()
        del batches
    return True


def _row(run: Run, row: dict[str, Any], data_s: float, step_s: float) -> dict[str, Any]:
    total = data_s + step_s
    regions = row["pixel_regions"] + row["box_regions"]
    return {"step": run.step, **row, "lr": run.optimizer.param_groups[0]["lr"],
            "images_per_s": row["images"] / total, "regions_per_s": regions / total,
            "data_s": round(data_s, 4), "step_s": round(step_s, 4), "images_seen": run.images_seen,
            "epoch": run.position.epoch(),
            "skipped": sum(run.position.error_counts().values()), "time": time.time()}


def finish(run: Run) -> dict[str, Any]:
    """Final weights, evaluation, loss curve."""
    result = run_eval(run)
    if run.info.main:
        from safetensors.torch import save_model

        save_model(run.model, str(run.out / "model.safetensors"))
        if result:
            with (run.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": run.step, "eval": result}) + "\n")
        result["skipped_training_inputs"] = run.position.error_counts()
        (run.out / "eval.json").write_text(json.dumps(result, indent=1))
        report.plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png")
        log.info("held-out: %s", _summary(result))
        log.info("wrote %s (model.safetensors, eval.json, loss_curve.png, metrics.jsonl)", run.out)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = distributed.setup("cuda" if args.device.startswith("cuda") or
                             (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    setup_logging(info)
    try:
        run = prepare(args, cfg, info)
        signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stop_requested", True))
        if run.step >= cfg.train.steps and (run.out / "eval.json").exists():
            log.info("%s is complete (step %d); nothing to do", run.out, run.step)
            return 0
        complete = train(run, args.stop_at_step) if run.step < cfg.train.steps else True
        if complete:
            finish(run)
        elif run.info.main:
            report.plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png")
        return 0
    except (ConfigError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
