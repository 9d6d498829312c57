"""Train the embedded class-conditional digits diffusion model (see :mod:`.diffusion`) and measure it.

    python -m tokred.tasks.embedded.train_diffusion            # installed package
    PYTHONPATH=. python -m tasks.embedded.train_diffusion      # from a source checkout

Epsilon-prediction DDPM training on the digits train split, 10% of labels dropped to the null class (for
classifier-free guidance), an EMA of the weights (the EMA is what gets saved). Resumable: a checkpoint is
written every ``--checkpoint-every`` epochs to ``--checkpoint-dir`` and picked up by the next run with the same
settings. Quality is the class accuracy of generated samples judged by the embedded digits ViT (train that
first: ``train_vit``). Deterministic for a given seed and thread count (CPU). Writes, atomically, beside
``--output``: ``<name>.safetensors``, ``<name>.json`` (config) and ``<name>_metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common, vit
from .data import load_digits_split
from .diffusion import (
    DEFAULT_WEIGHTS,
    NUM_CLASSES,
    build_digits_diffusion,
    load_digits_diffusion,
    make_scheduler,
    merge_config,
    sample_digits,
    state_dict_for_saving,
)

DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
# entries of the metrics file that describe training (kept by --eval-only)
TRAIN_INFO_KEYS = (
    "parameters",
    "epochs",
    "optimizer_steps",
    "train_time_s",
    "train_cpu_time_s",
    "periodic_evaluations",
    "command",
)
MODEL_SECTIONS = ("unet", "class_embed", "scheduler")
# settings that must not change between a checkpoint and the run resuming it
RESUME_KEYS = (
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "label_dropout",
    "ema_decay",
    "min_snr_gamma",
    "seed",
    "config",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=40,
        help="total epochs (raise it and rerun to continue a finished run from its checkpoint)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--label-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    p.add_argument("--ema-decay", type=float, default=0.997)
    p.add_argument(
        "--min-snr-gamma", type=float, default=0.0, help="Min-SNR loss weighting min(SNR, gamma)/SNR (0: plain MSE)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--config", type=str, default=None, help="JSON object overriding sections of the model config")
    p.add_argument("--output", type=Path, default=DEFAULT_WEIGHTS, help="weights file (.safetensors)")
    p.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINT_DIR)
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--eval-every", type=int, default=4, help="epochs between quick sample-accuracy checks (0: off)")
    p.add_argument("--eval-per-class", type=int, default=5, help="samples per class in the periodic checks")
    p.add_argument("--final-per-class", type=int, default=20, help="samples per class in the final evaluation")
    p.add_argument("--steps", type=int, default=20, help="sampling steps in evaluations")
    p.add_argument(
        "--guidance-scales",
        type=str,
        default="2,2.5,3",
        help="comma-separated CFG scales for the final evaluation (the config's default is reported first)",
    )
    p.add_argument("--sample-batch-size", type=int, default=50, help="labels per sampling call (x2 through the U-Net)")
    p.add_argument("--classifier", type=Path, default=None, help="digits ViT weights (default: the shipped ones)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the weights at --output")
    return p.parse_args(argv)


class EMA:
    """Exponential moving average of a set of parameters (with the usual warm-up of the decay)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach(), 1.0 - decay)


def named_params(unet, class_embed) -> dict[str, torch.Tensor]:
    params = {f"unet.{k}": v for k, v in unet.named_parameters()}
    params.update({f"class_embed.{k}": v for k, v in class_embed.named_parameters()})
    return params


def load_ema_into(ema: EMA, unet, class_embed) -> None:
    """Copy the EMA weights into (copies of) the models."""
    with torch.no_grad():
        for k, v in named_params(unet, class_embed).items():
            v.copy_(ema.shadow[k])


def lr_at(step: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then constant: with the EMA doing the averaging, a constant rate lets a finished run
    be extended (more --epochs) with exactly the result of a longer run."""
    return peak * min(1.0, (step + 1) / warmup)


@torch.no_grad()
def class_accuracy(
    unet, class_embed, classifier, per_class: int, steps: int, guidance_scale: float, batch_size: int, scheduler=None
) -> dict:
    """Generate ``per_class`` samples of every digit (image ``i`` seeded with ``i``) and classify them.

    Returns accuracy (%), per-class accuracy (%), the number of images and the sampling wall and CPU time.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    preds = []
    sampling_time = sampling_cpu = 0.0
    for i in range(0, len(labels), batch_size):
        chunk = labels[i : i + batch_size]
        gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        t0, c0 = time.perf_counter(), time.process_time()
        images = sample_digits(unet, class_embed, chunk, steps, guidance_scale, generator=gens, scheduler=scheduler)
        sampling_time += time.perf_counter() - t0
        sampling_cpu += time.process_time() - c0
        preds.append(classifier(images).argmax(-1))
    hits = torch.cat(preds) == labels
    per_digit = hits.view(NUM_CLASSES, per_class).float().mean(1) * 100
    return {
        "class_accuracy": round(hits.float().mean().item() * 100, 2),
        "per_class_accuracy": [round(a, 1) for a in per_digit.tolist()],
        "num_images": len(labels),
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "sampling_time_s": round(sampling_time, 2),
        "sampling_cpu_time_s": round(sampling_cpu, 2),
    }


def train(args: argparse.Namespace, config: dict, classifier) -> dict:
    """Train (or resume) and write the EMA weights + config; returns training info for the metrics file."""
    common.seed_everything(args.seed)
    unet, class_embed = build_digits_diffusion(config)
    noise_scheduler = make_scheduler("ddpm", config["scheduler"])
    images, labels = load_digits_split("train")
    n_params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in class_embed.parameters())
    print(f"digits diffusion: {n_params:,} parameters, {len(images)} train images", flush=True)

    params = named_params(unet, class_embed)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    ema = EMA(params, args.ema_decay)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    alphas_cumprod = noise_scheduler.alphas_cumprod
    num_t = noise_scheduler.config.num_train_timesteps

    # the model sections of the config (not "sampling": the default guidance may change after training)
    model_config = {k: config[k] for k in MODEL_SECTIONS}
    settings = {k: getattr(args, k) for k in RESUME_KEYS if k != "config"} | {"config": model_config}
    ckpt_path = args.checkpoint_dir / "digits_diffusion_last.pt"
    # wall and CPU seconds spent training (evaluations excluded); CPU time is what one uncontended core needs
    start_epoch, wall, cpu, history = 0, 0.0, 0.0, []
    if ckpt_path.is_file() and not args.fresh:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = dict(ckpt["settings"])
        saved["config"] = {k: saved.get("config", {}).get(k) for k in MODEL_SECTIONS}
        changed = [k for k in RESUME_KEYS if saved.get(k) != settings[k]]
        if changed:
            raise SystemExit(
                f"checkpoint {ckpt_path} was trained with other settings ({', '.join(changed)}); "
                "pass --fresh to start over or restore those settings"
            )
        unet.load_state_dict(ckpt["unet"])
        class_embed.load_state_dict(ckpt["class_embed"])
        opt.load_state_dict(ckpt["opt"])
        ema.shadow = ckpt["ema"]
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, wall, cpu, history = ckpt["epoch"], ckpt["wall_s"], ckpt["cpu_s"], ckpt["history"]
        print(f"resumed from {ckpt_path} at epoch {start_epoch} ({wall:.0f}s of training so far)", flush=True)

    # a copy of the models that receives the EMA weights for evaluation and saving
    ema_unet, ema_class_embed = build_digits_diffusion(config)
    unet.train()
    class_embed.train()
    for epoch in range(start_epoch + 1, args.epochs + 1):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        order = torch.randperm(len(images), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), args.batch_size):
            step = (epoch - 1) * steps_per_epoch + i // args.batch_size
            idx = order[i : i + args.batch_size]
            x0, y = images[idx], labels[idx].clone()
            y[torch.rand(len(y), generator=gen) < args.label_dropout] = class_embed.null_class
            t = torch.randint(0, num_t, (len(y),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            eps = unet(xt, t, encoder_hidden_states=class_embed(y)).sample
            loss = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
            if args.min_snr_gamma > 0:
                # Min-SNR weighting (Hang et al., 2023): the many nearly noise-free timesteps are easy and
                # pull the shared weights their own way; capping their weight speeds up convergence
                snr = a.view(-1) / (1 - a.view(-1))
                loss = loss * snr.clamp(max=args.min_snr_gamma) / snr
            loss = loss.mean()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.warmup_steps, args.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            ema.update(params, step)
            loss_sum += loss.item() * len(idx)
        wall += time.perf_counter() - wall_start
        cpu += time.process_time() - cpu_start
        msg = f"epoch {epoch:4d}/{args.epochs}  loss {loss_sum / len(images):.4f}  {wall:7.0f}s ({cpu:.0f}s CPU)"
        if args.eval_every and epoch % args.eval_every == 0 and epoch != args.epochs:
            load_ema_into(ema, ema_unet, ema_class_embed)
            res = class_accuracy(
                ema_unet.eval(),
                ema_class_embed.eval(),
                classifier,
                args.eval_per_class,
                args.steps,
                config["sampling"]["guidance_scale"],
                args.sample_batch_size,
            )
            history.append({"epoch": epoch, "class_accuracy": res["class_accuracy"]})
            msg += f"  EMA sample accuracy {res['class_accuracy']:.1f}% ({res['num_images']} samples)"
        print(msg, flush=True)
        if epoch % args.checkpoint_every == 0 or epoch == args.epochs:
            common.torch_save(
                ckpt_path,
                {
                    "epoch": epoch,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "history": history,
                    "settings": settings,
                    "unet": unet.state_dict(),
                    "class_embed": class_embed.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema.shadow,
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
            )

    load_ema_into(ema, ema_unet, ema_class_embed)
    state = state_dict_for_saving(ema_unet, ema_class_embed)
    common.save_safetensors(args.output, state, metadata={"config": json.dumps(config)})
    common.write_json(common.config_path(args.output), config)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB) and its config", flush=True)
    return {
        "parameters": n_params,
        "epochs": args.epochs,
        "optimizer_steps": total_steps,
        "train_time_s": round(wall, 1),
        "train_cpu_time_s": round(cpu, 1),
        "periodic_evaluations": history,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    judge = vit.load_digits_vit(args.classifier)

    def classifier(images: torch.Tensor) -> torch.Tensor:
        return judge(images)

    metrics_path = args.output.with_name(args.output.stem + "_metrics.json")
    if args.eval_only:
        if not metrics_path.is_file():
            raise SystemExit(f"--eval-only needs the training metrics {metrics_path} of the weights at {args.output}")
        previous = json.loads(metrics_path.read_text(encoding="utf-8"))
        info = {k: previous[k] for k in TRAIN_INFO_KEYS if k in previous}
        info["train_command"] = info.pop("command", None)
    else:
        config = merge_config(json.loads(args.config) if args.config else None)
        info = train(args, config, classifier)
        info["train_command"] = common.command_line(__spec__.name if __spec__ else None)

    # final evaluation on the weights as saved (through the public loader)
    unet, class_embed, scheduler = load_digits_diffusion(args.output)
    config = json.loads(common.config_path(args.output).read_text(encoding="utf-8"))
    default_scale = float(config["sampling"]["guidance_scale"])
    scales = [default_scale] + [s for s in map(float, args.guidance_scales.split(",")) if s != default_scale]
    results = []
    for scale in scales:
        res = class_accuracy(
            unet,
            class_embed,
            classifier,
            args.final_per_class,
            args.steps,
            scale,
            args.sample_batch_size,
            scheduler=scheduler,
        )
        results.append(res)
        print(
            f"guidance {scale:g}: class accuracy {res['class_accuracy']:.2f}% of {res['num_images']} samples, "
            f"per class {res['per_class_accuracy']}, sampling {res['sampling_time_s']:.1f}s",
            flush=True,
        )

    metrics = {
        "model": "digits_diffusion",
        "class_accuracy": results[0]["class_accuracy"],
        "guidance_scale": default_scale,
        "num_inference_steps": args.steps,
        "sampler": type(scheduler).__name__,
        "num_samples": results[0]["num_images"],
        "sampling_time_s": results[0]["sampling_time_s"],
        "sampling_cpu_time_s": results[0]["sampling_cpu_time_s"],
        "sampling_batch": f"{args.sample_batch_size} labels per call ({2 * args.sample_batch_size} with CFG)",
        "evaluations": results,
        "judge": f"digits ViT ({common.relative_to_cwd(args.classifier or vit.DEFAULT_WEIGHTS)})",
        **{k: v for k, v in info.items() if k != "train_command"},
        "threads": args.threads,
        "seed": args.seed,
        "command": info["train_command"],
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "weights": common.relative_to_cwd(args.output),
    }
    if args.eval_only:
        metrics["eval_command"] = common.command_line(__spec__.name if __spec__ else None)
    common.write_json(metrics_path, metrics)
    print(f"wrote {metrics_path}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
