"""The model directory a launch serves: the configured one, or a generated one cached by preset and seed.

Protocol
--------
* ``ensure_model_dir(model, override)``: ``override`` (``serve --model-dir``) wins, then ``model.path``;
  either must be a directory with a ``config.json`` (else :class:`ModelDirError`).
* Otherwise the directory is generated with the engine's writer (``engine.weights.init_model_dir``, the
  same as ``dynamo-ext model init``: random weights on CPU, deterministic per seed, streamed to the file) at
  ``<cache>/models/<preset>-seed<seed>-<dtype>[-L<num_layers>]`` (``-L`` only when ``model.num_layers`` is
  set) where ``<cache>`` is ``$DYNAMO_EXT_CACHE`` or ``~/.cache/dynamo_ext``. Every process of a graph
  loads that one directory, so they all hold the same weights (greedy outputs agree across roles). It is
  written into a temporary sibling and renamed into place, so a concurrent launch either sees the complete
  directory or writes its own copy; a complete directory (has ``config.json``, ``tokenizer.json`` and
  ``model.safetensors``) is reused. llama3-8b-shape with 8 layers in bfloat16 (1.75 G parameters, 3.5 GB):
  ~15 s on 2 shared CPU cores, bound by the file write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dynamo_ext.config import ModelConfig

COMPLETE = ("config.json", "tokenizer.json", "model.safetensors")


class ModelDirError(Exception):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("DYNAMO_EXT_CACHE") or Path.home() / ".cache" / "dynamo_ext")


def cached_dir(model: ModelConfig) -> Path:
    layers = "" if model.num_layers is None else f"-L{model.num_layers}"
    return cache_root() / "models" / f"{model.preset}-seed{model.seed}-{model.dtype}{layers}"


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in COMPLETE)


def ensure_model_dir(model: ModelConfig, override: str | None = None) -> tuple[Path, str]:
    """``(directory, how)`` with how one of ``given``, ``config``, ``cached``, ``generated``."""
    for given, how in ((override, "given"), (model.path, "config")):
        if given:
            p = Path(given).expanduser().resolve()
            if not (p / "config.json").is_file():
                key = "--model-dir" if how == "given" else "model.path"
                raise ModelDirError(f"{key}: {p} is not a model directory (no config.json)")
            return p, how
    target = cached_dir(model)
    if is_complete(target):
        return target, "cached"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        from dynamo_ext.engine.weights import init_model_dir

        init_model_dir(tmp, model.preset, seed=model.seed, num_layers=model.num_layers, dtype=model.dtype)
        try:
            os.rename(tmp, target)
        except OSError:  # someone else renamed theirs first (or a partial directory is in the way)
            if not is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, "generated"
