"""A bare check of the harness's DeiT-S number: the same two calls, alternated, in fresh processes, no harness.

Each of ``--processes`` fresh Python processes (started one after another with ``subprocess``, so each is a new
interpreter: its own memory layout, allocator state and thread placement) builds timm's ``deit_small_patch16_224``
at random init (seeded), sets ``--threads`` torch threads, makes one random batch of ``--batch`` images, and times
``--rounds`` rounds of one unpatched forward pass and one forward pass with ``tokred.apply(model, "tome", r=R)``,
the order alternating from round to round, after ``--warmup`` untimed rounds. The patch is applied before each
method call and removed before each baseline call (untimed), as the harness does; ``--two-models`` instead keeps
a second, patched copy of the model and switches nothing.

Each process prints its median ratio (baseline time / method time); the parent prints them all, the pooled speedup
with the process-aware interval of ``tokred run`` (:func:`tokred.bench.stats.process_speedup`: the geometric mean
of the per-process medians, with a t interval over them widened to at least the pooled rounds' bootstrap), the
spread of the processes, and the FLOPs-ideal speedup (baseline GFLOPs / ToMe's, counted by torch's FLOP counter).

    python benchmarks/bare_deit_s.py --processes 8 --rounds 30          # the default settings: DeiT-S, r=13, 8 x 2
    python benchmarks/bare_deit_s.py --json out.json                     # also the raw per-round times

Not a pytest benchmark (its name does not start with ``test_``); nothing here is imported by tokred. Timings are
only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODEL = "deit_small_patch16_224"


def worker(args: argparse.Namespace) -> dict:
    """One process's rounds (runs in a fresh interpreter)."""
    import copy

    import timm
    import torch

    import tokred

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    batch = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    patched = None
    if args.two_models:
        patched = copy.deepcopy(model)
        tokred.apply(patched, "tome", r=args.r)

    state = {"patch": None}

    def use(variant: str) -> torch.nn.Module:
        if patched is not None:
            return patched if variant == "method" else model
        if variant == "method" and state["patch"] is None:
            state["patch"] = tokred.apply(model, "tome", r=args.r)
        elif variant == "baseline" and state["patch"] is not None:
            state["patch"].remove()
            state["patch"] = None
        return model

    times = {"baseline": [], "method": []}
    with torch.inference_mode():
        for i in range(args.warmup + args.rounds):
            order = ("baseline", "method") if i % 2 == 0 else ("method", "baseline")
            for variant in order:
                m = use(variant)
                start = time.perf_counter()
                m(batch)
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[variant].append(elapsed)
    ratios = [b / m for b, m in zip(times["baseline"], times["method"], strict=True)]
    return {"pid": os.getpid(), "median_ratio": statistics.median(ratios), "ratios": ratios,
            "baseline_ms": 1000 * statistics.median(times["baseline"]),
            "method_ms": 1000 * statistics.median(times["method"]), **times}


def flops_ideal(r: int, batch: int) -> tuple[float, float, float]:
    """(baseline GFLOPs, ToMe's GFLOPs, their ratio) per image, of one forward pass."""
    import timm
    import torch

    import tokred
    from tokred.flops import count_flops

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    base = count_flops(lambda: model(x)) / batch / 1e9
    patch = tokred.apply(model, "tome", r=r)
    tome = count_flops(lambda: model(x)) / batch / 1e9
    patch.remove()
    return base, tome, base / tome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="fresh processes, one after another (default 8)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per process (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--r", type=int, default=13, help="ToMe's r (default 13)")
    parser.add_argument("--two-models", action="store_true", help="a patched copy instead of apply/remove")
    parser.add_argument("--json", default=None, help="write every process's rounds to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("processes", "rounds", "threads", "batch", "r"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from tokred.bench.stats import process_speedup

    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    results = []
    for i in range(args.processes):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--worker"], check=True,
                             capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"process {i + 1}/{args.processes} (pid {res['pid']}): {res['median_ratio']:.3f}x "
              f"(baseline {res['baseline_ms']:.1f} ms, tome {res['method_ms']:.1f} ms, {len(res['ratios'])} rounds)",
              flush=True)
    est = process_speedup([r["ratios"] for r in results])
    medians = sorted(r["median_ratio"] for r in results)
    base, tome, ideal = flops_ideal(args.r, args.batch)
    print(f"\n{MODEL}, tome r={args.r}, batch {args.batch}, {args.threads} threads, "
          f"{'two models' if args.two_models else 'apply/remove'}:")
    spread = medians[-1] / medians[0] - 1
    print(f"  per-process medians: {', '.join(f'{m:.3f}' for m in medians)} (spread {spread:.1%})")
    print(f"  pooled: {est.value:.3f}x [{est.ci[0]:.3f}, {est.ci[1]:.3f}] over {args.processes} processes")
    print(f"  FLOPs-ideal: {ideal:.3f}x ({base:.3f} -> {tome:.3f} GFLOPs per image); efficiency "
          f"{est.value / ideal:.1%}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"settings": vars(args), "processes": results, "speedup": est.value, "ci": list(est.ci),
                       "flops_ideal": ideal, "gflops": [base, tome]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
