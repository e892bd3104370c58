"""Tokenizer: a deterministic byte-level BPE ``tokenizer.json`` built offline, or a model directory's own.

    build_byte_tokenizer() -> tokenizers.Tokenizer    ids 0..255 = bytes (GPT-2 byte-to-unicode alphabet),
                                                      256 <|begin_of_text|>, 257 <|end_of_text|>, 258 <|pad|>
    TextTokenizer(tok, bos_id, eos_id, pad_id)        encode(text, add_bos) / decode(ids) / save(dir)
    TextTokenizer.byte_level() / .from_dir(dir)       dir: tokenizer.json (+ tokenizer_config.json for specials
                                                      and add_bos_token: whether encode prepends BOS by default)
    tokenizer_config(tok) -> dict                     tokenizer_config.json with chat_template, bos/eos/pad

No merges are learnt: every byte is a token, so the file is the same on every machine and any text
round-trips. The BPE model with an empty merge list is what the Rust ``tokenizers`` crate (Dynamo's
frontend) loads as a normal byte-level BPE tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer() -> Tokenizer:
    vocab = {ch: b for b, ch in sorted(_bytes_to_unicode().items())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    return tok


class TextTokenizer:
    def __init__(self, tok: Tokenizer, bos_token_id: int, eos_token_id: int, pad_token_id: int | None,
                 add_bos_token: bool = True):
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token  # encode()'s default (tokenizer_config.json add_bos_token)

    @classmethod
    def byte_level(cls) -> "TextTokenizer":
        tok = build_byte_tokenizer()
        return cls(tok, tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD))

    @classmethod
    def from_dir(cls, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None) -> "TextTokenizer":
        path = Path(path)
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

        def special(key: str, fallback: int | None) -> int | None:
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and tok.token_to_id(v) is not None:
                return tok.token_to_id(v)
            return fallback

        bos = special("bos_token", bos_token_id)
        eos = special("eos_token", eos_token_id)
        if bos is None or eos is None:
            raise ValueError(f"{path}: cannot tell bos/eos token ids (tokenizer_config.json or config.json)")
        return cls(tok, bos, eos, special("pad_token", None), bool(cfg.get("add_bos_token", True)))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` (None: the tokenizer's ``add_bos_token``)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(self), indent=2) + "\n")


def tokenizer_config(t: TextTokenizer) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": t.token(t.bos_token_id),
        "eos_token": t.token(t.eos_token_id),
        "pad_token": t.token(t.pad_token_id) if t.pad_token_id is not None else None,
        "add_bos_token": t.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": CHAT_TEMPLATE,
    }
