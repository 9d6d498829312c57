"""Train the embedded digits ViT (see :mod:`.vit`) and write its weights, config and metrics.

    python -m tokred.tasks.embedded.train_vit            # installed package
    PYTHONPATH=. python -m tasks.embedded.train_vit      # from a source checkout

Deterministic for a given seed and thread count (CPU). Writes, atomically, beside ``--output``:
``<name>.safetensors`` (fp32 weights), ``<name>.json`` (the ViT config) and ``<name>_metrics.json``.
The model saved is the one after the last epoch: the test split is only reported, never used to choose.
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
from .data import load_digits_split, random_affine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="disable random rotation/shift/scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=5, help="print test accuracy every N epochs")
    p.add_argument("--output", type=Path, default=vit.DEFAULT_WEIGHTS, help="weights file (.safetensors)")
    p.add_argument("--config", type=str, default=None, help="JSON object overriding the default ViT config")
    return p.parse_args(argv)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    common.seed_everything(args.seed)

    config = {**vit.DEFAULT_CONFIG, **(json.loads(args.config) if args.config else {})}
    model = vit.build_digits_vit(config)
    train_x, train_y = load_digits_split("train")
    test_x, test_y = load_digits_split("test")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits ViT: {n_params:,} parameters, {len(train_x)} train / {len(test_x)} test images", flush=True)

    # no weight decay on biases, norms, position embedding and cls token (the usual ViT recipe)
    def decays(name: str, param: torch.Tensor) -> bool:
        return param.ndim > 1 and name not in ("pos_embed", "cls_token")

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)

    # wall and CPU seconds (CPU time is what one uncontended core needs; evaluations are included)
    start, cpu_start = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = train_x[idx], train_y[idx]
            if not args.no_augment:
                x = random_affine(x, generator=gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, args.lr)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(-1) == y).sum().item()
        msg = (
            f"epoch {epoch:3d}/{args.epochs}  loss {loss_sum / len(train_x):.4f}  "
            f"train acc (augmented) {100 * correct / len(train_x):5.1f}%  {time.perf_counter() - start:6.0f}s"
        )
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            msg += f"  test acc {100 * vit.accuracy(model, test_x, test_y):5.2f}%"
        print(msg, flush=True)
    train_time = time.perf_counter() - start
    train_cpu = time.process_time() - cpu_start

    model.eval()
    test_acc = vit.accuracy(model, test_x, test_y)
    train_acc = vit.accuracy(model, train_x, train_y)
    print(f"final: test top-1 {100 * test_acc:.2f}%, train top-1 {100 * train_acc:.2f}%, {train_time:.0f}s", flush=True)

    output = args.output
    common.save_safetensors(output, model.state_dict(), metadata={"config": json.dumps(config)})
    common.write_json(common.config_path(output), config)
    metrics = {
        "model": "digits_vit",
        "test_top1": round(100 * test_acc, 2),
        "train_top1": round(100 * train_acc, 2),
        "test_images": len(test_x),
        "train_images": len(train_x),
        "parameters": n_params,
        "epochs": args.epochs,
        "train_time_s": round(train_time, 1),
        "train_cpu_time_s": round(train_cpu, 1),
        "threads": args.threads,
        "seed": args.seed,
        "command": common.command_line(__spec__.name if __spec__ else None),
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
        "weights": common.relative_to_cwd(output),
    }
    common.write_json(output.with_name(output.stem + "_metrics.json"), metrics)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB), its config and metrics", flush=True)
    return metrics


if __name__ == "__main__":
    main()
