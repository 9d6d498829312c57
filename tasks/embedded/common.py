"""Helpers shared by the embedded training scripts: atomic file writes, seeding, the recorded command line."""

from __future__ import annotations

import json
import os
import random
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on one file system, so a reader (or an interrupted run) never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    return _atomic(path, write)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def command_line(module: str | None) -> str:
    """The command that ran this script, as ``python -m <module> <args>`` (shell-quoted)."""
    prog = f"python -m {module}" if module else shlex.join([sys.executable, sys.argv[0]])
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def relative_to_cwd(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (for readable metrics files)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def config_path(weights_path: str | os.PathLike) -> Path:
    """The JSON config stored beside a weights file (``x.safetensors`` -> ``x.json``)."""
    return Path(weights_path).with_suffix(".json")


def read_weights(path: Path, what: str, train_module: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The tensors of a shipped safetensors file and its config (the JSON beside it, else the file's metadata).

    A missing file raises FileNotFoundError saying where it was looked for and how to train it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights not found at {path.resolve()}; train them with "
            f"`python -m tokred.tasks.embedded.{train_module}` (or pass weights_path=)"
        )
    config = None
    if config_path(path).is_file():
        config = json.loads(config_path(path).read_text(encoding="utf-8"))
    else:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" in meta:
            config = json.loads(meta["config"])
    return load_file(str(path)), config
