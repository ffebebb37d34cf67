"""The tokenizer as GGUF metadata, in llama.cpp's two layouts.

- `gpt2`: byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2 style): tokens in the byte alphabet, merges,
  and a pre-tokenizer name (`tokenizer.ggml.pre`) that tells llama.cpp how text is split.
- `llama`: sentencepiece-style BPE with byte fallback (Llama 2, Mistral v0.1, Gemma): `▁`-spelled
  tokens, scores (llama.cpp merges the highest-scoring pair first) and token types (<0xNN> bytes).

Both are read from the tokenizer's own `tokenizer.json`, so no sentencepiece model file is needed.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, TokenType

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    model: str  # gpt2 | llama
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, w: GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast tokenizer (tokenizer.json); this one is a slow tokenizer. "
                         "Save it with transformers' AutoTokenizer (use_fast=True) first.")
    return json.loads(backend.to_str())


def _components(node: dict[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    """All pre-tokenizers / normalizers of `node`, with Sequences flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if kind == "pre" else ("normalizers" if kind == "norm" else "decoders")
        out = []
        for child in node.get(key, []):
            out += _components(child, kind)
        return out
    return [node]


def _regex_of(pre: dict[str, Any]) -> str:
    pat = pre.get("pattern") or {}
    return pat.get("Regex") or pat.get("String") or ""


def detect_pre(tj: dict[str, Any]) -> str:
    """llama.cpp's name for how this byte-level tokenizer splits text before BPE."""
    parts = _components(tj.get("pre_tokenizer"), "pre")
    types = [p.get("type") for p in parts]
    splits = [_regex_of(p) for p in parts if p.get("type") == "Split"]
    if splits:
        rx = splits[0]
        if "(?i:'s" in rx and r"\p{N}{1,3}" in rx:
            return "llama-bpe"
        if "(?i:'s" in rx and (r"|\p{N}|" in rx or r"\p{N}|" in rx):
            return "qwen2"
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    warnings.warn(f"unrecognised pre-tokenizer {types}; writing tokenizer.ggml.pre=default (llama.cpp may "
                  "split text differently from transformers)", stacklevel=3)
    return "default"


def _merges(tj: dict[str, Any]) -> list[str]:
    out = []
    for m in tj["model"].get("merges") or []:
        out.append(" ".join(m) if isinstance(m, (list, tuple)) else m)
    return out


def _token_table(tokenizer: Any, tj: dict[str, Any], n_vocab: int) -> tuple[list[str], dict[int, dict[str, Any]]]:
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    if n_vocab < len(by_id):
        top = max(by_id)
        if top >= n_vocab:
            raise ValueError(f"the tokenizer has token id {top} but the model's vocabulary is only {n_vocab} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    return tokens, added


def build_vocab(tokenizer: Any, n_vocab: int, model_config: dict[str, Any] | None = None) -> GGUFVocab:
    """GGUF vocabulary of a transformers fast tokenizer, padded to the model's `n_vocab` embedding rows."""
    tj = _tokenizer_json(tokenizer)
    mtype = tj["model"].get("type")
    if mtype != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers (byte-level or sentencepiece-style); this one is "
                         f"{mtype}")
    tokens, added = _token_table(tokenizer, tj, n_vocab)
    spm = bool(tj["model"].get("byte_fallback"))
    vocab_ids = tokenizer.get_vocab()
    unk = tj["model"].get("unk_token") or getattr(tokenizer, "unk_token", None)
    types = []
    for i, tok in enumerate(tokens):
        if spm and tok == unk:
            types.append(int(TokenType.UNKNOWN))
        elif i in added:
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        elif tok.startswith("[PAD") and tok == f"[PAD{i}]" and tok not in vocab_ids:
            types.append(int(TokenType.UNUSED))
        elif spm and _BYTE_TOKEN.fullmatch(tok):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.NORMAL))
    merges = _merges(tj)
    if spm:
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        # llama.cpp's sentencepiece tokenizer merges the pair whose result scores highest: score = -merge rank
        scores = [-float(rank[t]) if t in rank else (0.0 if types[i] != TokenType.NORMAL else -float(len(merges) + i))
                  for i, t in enumerate(tokens)]
        model, pre = "llama", "default"
        add_space = _adds_space_prefix(tj)
    else:
        scores = None
        model, pre = "gpt2", detect_pre(tj)
        add_space = None
    specials: dict[str, int] = {}
    for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id")):
        tid = getattr(tokenizer, attr, None)
        if tid is None and model_config is not None:
            tid = model_config.get(attr) if not isinstance(model_config.get(attr), list) else model_config[attr][0]
        if tid is not None and 0 <= int(tid) < n_vocab:
            specials[kind] = int(tid)
    eot = _end_of_turn(vocab_ids, specials.get("eos"))
    if eot is not None:
        specials["eot"] = eot
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return GGUFVocab(model=model, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges,
                     special_ids=specials, add_bos=_adds_bos(tokenizer), add_eos=_adds_eos(tokenizer),
                     add_space_prefix=add_space, chat_template=template)


def _end_of_turn(vocab: dict[str, int], eos: int | None) -> int | None:
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if tok in vocab and vocab[tok] != eos:
            return int(vocab[tok])
    return None


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return bool(getattr(tokenizer, "add_bos_token", False))
    return bool(ids) and ids[0] == bos


def _adds_eos(tokenizer: Any) -> bool:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(ids) and ids[-1] == eos


def _adds_space_prefix(tj: dict[str, Any]) -> bool:
    for p in _components(tj.get("pre_tokenizer"), "pre"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
    for n in _components(tj.get("normalizer"), "norm"):
        if n.get("type") == "Prepend":
            return True
    return False
