"""Scale-out: split per-item work (generation, feature extraction, evaluation batches) across processes with
Hugging Face ``accelerate``, and gather the results on every process.

The tasks call :func:`shard` and :func:`gather` around their per-item loops. Each item carries its global
index (and, for generation, its seed is derived from that index), so a sharded run computes exactly what a
single process computes, only split: process ``k`` of ``n`` takes a contiguous slice of the items
(``PartialState.split_between_processes``) and ``gather_object`` concatenates the slices in process order.
Without a multi-process launch both are no-ops.

Launch one of the tasks on several processes with this module's command line::

    # GPUs (one process per GPU)
    accelerate launch --num_processes 4 -m tokred.tasks.sharding text_to_image --size full --device cuda \\
        --set num_images=2000 --reference --method tome --method-option ratio=0.5 --out tome.json
    # CPU processes: accelerate's own multi-CPU launcher needs MPI, torchrun does not
    torchrun --standalone --nproc_per_node 2 -m tokred.tasks.sharding text_to_image --device cpu --out r.json

Every process builds the task and works on its share; process 0 writes the JSON result (and, with
``--save-images``, the gathered generated images as a ``torch.save`` file).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def process_state():
    """accelerate's ``PartialState`` for this process (initialises the process group under a launcher).

    On a machine without CUDA the state is created in CPU mode, so a ``torchrun``/``accelerate launch``
    with several processes uses the gloo backend (accelerate would otherwise fall back to one process).
    """
    from accelerate import PartialState

    if PartialState._shared_state:  # already initialised (the first call decides the backend)
        return PartialState()
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def num_processes() -> int:
    return process_state().num_processes if _launched() else 1


def process_index() -> int:
    return process_state().process_index if _launched() else 0


def is_main_process() -> bool:
    return process_index() == 0


@contextmanager
def shard(items: Iterable[Any]) -> Iterator[list[Any]]:
    """``with shard(range(n)) as mine:`` this process's contiguous share of ``items`` (all of them when
    there is a single process)."""
    items = list(items)
    if not _launched():
        yield items
        return
    with process_state().split_between_processes(items) as local:
        yield list(local)


def gather(local: list[Any]) -> list[Any]:
    """The concatenation, in process order, of every process's ``local`` list (on every process)."""
    if not _launched():
        return list(local)
    from accelerate.utils import gather_object

    process_state()
    return list(gather_object(list(local)))


def barrier() -> None:
    if _launched():
        process_state().wait_for_everyone()


# --- command line ------------------------------------------------------------------------------------------


def _parse_assignments(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokred.tasks.sharding",
        description="Run one task's evaluation, sharded over the processes of an accelerate/torchrun launch.",
    )
    parser.add_argument("task", help="task name, e.g. text_to_image or vit_classification")
    parser.add_argument("--size", default="embedded", choices=("embedded", "arch", "full"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (task default if omitted)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="task constructor argument")
    parser.add_argument("--reference", action="store_true", help="record the unreduced reference first")
    parser.add_argument("--method", default=None, help="token-reduction method to apply before evaluating")
    parser.add_argument("--method-option", action="append", metavar="KEY=VALUE", help="method option")
    parser.add_argument("--seed", type=int, default=None, help="the method's seed (tokred.apply(seed=...))")
    parser.add_argument("--out", default=None, help="JSON file for the results (written by process 0)")
    parser.add_argument("--save-images", default=None, help="text_to_image: torch.save the gathered images here")
    args = parser.parse_args(argv)

    import tokred
    from tokred.bench.task import get_task

    kwargs = _parse_assignments(args.set)
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    task = get_task(args.task)(size=args.size, device=args.device, **kwargs)
    task.setup()
    if args.reference or args.method:
        task.record_reference()
    patch = None
    if args.method:
        patch = tokred.apply(task.model, args.method, seed=args.seed, **_parse_assignments(args.method_option))
    images = task.generate_images() if args.save_images else None
    metrics = task.evaluate()
    if patch is not None:
        patch.remove()
    if is_main_process():
        result = {
            "task": task.describe(),
            "method": args.method,
            "method_options": _parse_assignments(args.method_option),
            "num_processes": num_processes(),
            "metrics": metrics,
            "metrics_ci": getattr(metrics, "ci", {}),  # 95% intervals (tokred.bench.task.Quality)
            "metrics_n": getattr(metrics, "n", {}),
        }
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(_jsonable(result), fh, indent=2)
        else:
            print(json.dumps(_jsonable(result), indent=2))
        if images is not None:
            torch.save(images, args.save_images)
    barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
