"""Batched tokenization of format specs into ids and labels (labels[i] == ids[i] where trained, else -100).

Whole documents are tokenized at once with the fast tokenizer (Rust, multi-threaded) and trained
character spans become token spans through the encodings' char->token maps, so the ids are exactly the
tokenizer's own tokenization of the rendered text. A token overlapping a trained span is trained.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .templates import _lcp, special_pattern
from .types import IGNORE


class TokenizerInfo:
    """The tokenizer plus what the pipeline needs from it, computed once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())  # a copy without truncation/padding
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.adds_bos = bool(self.bos_id is not None and with_special[:1] == [self.bos_id] and plain[:1] != [self.bos_id])
        self.bos_text = tokenizer.bos_token if self.adds_bos else ""
        self.eos_text = tokenizer.eos_token or ""
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False):
                specials.add(tok.content)
        self.special_strings = sorted(s for s in specials if s)
        self.specials = special_pattern(self.special_strings)
        # Tokens after which a text cannot be cut and tokenized in two: they eat the following whitespace,
        # or a longer added token starts with them.
        added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self._unsafe_boundaries = {s for s in self.special_strings
                                   if getattr(added.get(s), "rstrip", False) or getattr(added.get(s), "single_word", False)
                                   or any(a != s and a.startswith(s) for a in added)}
        self.template_kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Hash of everything that changes token ids: vocab, merges, normalizer, added tokens, template."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self.backend is not None:
                h.update(self.backend.to_str().encode())
            else:
                h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
                h.update(type(self.tokenizer).__name__.encode())
            h.update(json.dumps({"template": getattr(self.tokenizer, "chat_template", None),
                                 "special": self.tokenizer.special_tokens_map, "adds_bos": self.adds_bos},
                                sort_keys=True, default=str).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ---------------------------------------------------------------------------------------- encoding
    def encode_offsets(self, texts: list[str]) -> list[Any]:
        """Encodings with `ids`, `char_to_token(c)` and `token_to_chars(t)`."""
        if not texts:
            return []
        if self.backend is None:
            return [_SlowEncoding(self.tokenizer, t) for t in texts]
        shared = self._shared_prefix(texts)
        if shared:
            head = self.backend.encode(texts[0][:shared], add_special_tokens=False)
            rest = self.backend.encode_batch([t[shared:] for t in texts], add_special_tokens=False)
            check = self.backend.encode(texts[-1], add_special_tokens=False).ids
            if check == head.ids + rest[-1].ids:
                return [_Joined(head, e, shared) for e in rest]
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def _shared_prefix(self, texts: list[str]) -> int:
        """Length of a prefix all texts share that ends just after a special token (tokenization splits
        there, so the prefix is tokenized once: a chat template's system prompt, say); 0 if none."""
        if len(texts) < 8:
            return 0
        first = texts[0]
        n = len(first)
        for t in texts[1:]:
            n = _lcp(first[:n], t)
            if n < 32:
                return 0
        last = None
        for m in self.specials.finditer(first, 0, n):
            last = m
        if last is None or last.end() < 32 or last.group(0) in self._unsafe_boundaries:
            return 0
        return last.end()

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


class _SlowEncoding:
    """For tokenizers without offsets: every character maps to the token holding it, found by
    tokenizing growing prefixes (slow, only used for python-only tokenizers)."""

    def __init__(self, tokenizer: Any, text: str):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self._starts: list[int] = []
        pos = 0
        for i in range(len(self.ids)):
            piece = tokenizer.decode(self.ids[: i + 1])
            self._starts.append(pos)
            pos = min(len(text), len(piece))
        self._n = len(text)

    def char_to_token(self, c: int) -> int | None:
        import bisect

        if c < 0 or c >= self._n or not self._starts:
            return None
        return max(0, bisect.bisect_right(self._starts, c) - 1)

    def token_to_chars(self, t: int) -> tuple[int, int]:
        end = self._starts[t + 1] if t + 1 < len(self._starts) else self._n
        return self._starts[t], end


class _Joined:
    """Encoding of prefix + text from the two encodings (char and token positions shifted)."""

    __slots__ = ("head", "tail", "cut", "n_head", "ids")

    def __init__(self, head: Any, tail: Any, cut: int):
        self.head, self.tail, self.cut = head, tail, cut
        self.n_head = len(head.ids)
        self.ids = head.ids + tail.ids

    def char_to_token(self, c: int) -> int | None:
        if c < self.cut:
            return self.head.char_to_token(c)
        t = self.tail.char_to_token(c - self.cut)
        return None if t is None else t + self.n_head

    def token_to_chars(self, t: int) -> tuple[int, int] | None:
        if t < self.n_head:
            return self.head.token_to_chars(t)
        span = self.tail.token_to_chars(t - self.n_head)
        return None if span is None else (span[0] + self.cut, span[1] + self.cut)


def _first_token(enc: Any, a: int, b: int) -> int | None:
    for c in range(a, b):
        t = enc.char_to_token(c)
        if t is not None:
            return t
    return None


def _last_token(enc: Any, a: int, b: int, n: int) -> int | None:
    t = None
    for c in range(b - 1, a - 1, -1):
        t = enc.char_to_token(c)
        if t is not None:
            break
    if t is None:
        return None
    while t + 1 < n:  # tokens sharing the last character (a multi-byte character split into bytes)
        nxt = enc.token_to_chars(t + 1)
        if nxt is None or nxt[0] >= b:
            break
        t += 1
    return t


def labels_from_spans(enc: Any, ids: list[int], spans: list[tuple[int, int]], text_len: int) -> list[int]:
    n = len(ids)
    if len(spans) == 1 and spans[0][0] <= 0 and spans[0][1] >= text_len:
        return list(ids)
    labels = [IGNORE] * n
    for a, b in spans:
        if b <= a:
            continue
        t0 = _first_token(enc, a, b)
        if t0 is None:
            continue
        t1 = _last_token(enc, a, b, n)
        if t1 is None or t1 < t0:
            continue
        labels[t0 : t1 + 1] = ids[t0 : t1 + 1]
    return labels


def _dedupe_ends(ids: list[int], labels: list[int], bos: int | None, eos: int | None) -> None:
    """Never a doubled bos or eos (a template that writes bos_token on top of data that starts with it)."""
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        del ids[0], labels[0]
    if eos is not None and len(ids) >= 2 and ids[-1] == eos and ids[-2] == eos:
        del ids[-1]
        del labels[-2]  # keep the trained flag of the last one


def spec_texts(specs: list[tuple]) -> tuple[list[str], list[str]]:
    """The texts to tokenize for a batch of specs: (with offsets, ids only)."""
    offset_texts: list[str] = []
    plain_texts: list[str] = []
    for s in specs:
        kind = s[0]
        if kind == "text":
            offset_texts.append(s[1])
        elif kind == "pref":
            offset_texts += [s[1][0], s[2][0]]
        elif kind == "kto":
            offset_texts.append(s[1])
        elif kind == "segments":
            plain_texts += [t for t, _ in s[1]]
        elif kind == "prm":
            plain_texts.append(s[1])
            plain_texts += s[2]
        elif kind == "prompt":
            plain_texts.append(s[1])
    return offset_texts, plain_texts


def tokenize_texts(info: TokenizerInfo, texts: tuple[list[str], list[str]]) -> tuple[list[Any], list[list[int]]]:
    """The tokenizer calls alone (they release the GIL, so they can run in a thread)."""
    return info.encode_offsets(texts[0]), info.encode_ids(texts[1])


def assemble(specs: list[tuple], tokenized: tuple[list[Any], list[list[int]]], info: TokenizerInfo) -> list[Any]:
    """Ids and labels per spec.

    Returns one entry per spec: ("text", ids, labels, chunk) | ("pair", (ids, labels), (ids, labels)) |
    ("kto", ids, labels, label, prompt_len) | ("prompt", ids, columns); segments and prm give ("text", ...).
    """
    encs, plain = tokenized
    oi = pi = 0
    out: list[Any] = []
    bos, eos = info.bos_id, info.eos_id

    def take_offsets(text: str, spans: list) -> tuple[list[int], list[int]]:
        nonlocal oi
        enc = encs[oi]
        oi += 1
        ids = enc.ids
        labels = labels_from_spans(enc, ids, spans, len(text))
        _dedupe_ends(ids, labels, bos, eos)
        return ids, labels

    for s in specs:
        kind = s[0]
        if kind == "text":
            ids, labels = take_offsets(s[1], s[2])
            out.append(("text", ids, labels, s[3]))
        elif kind == "pref":
            out.append(("pair", take_offsets(*s[1]), take_offsets(*s[2])))
        elif kind == "kto":
            ids, labels = take_offsets(s[1], s[2])
            prompt_len = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(ids))
            out.append(("kto", ids, labels, s[3], prompt_len))
        elif kind == "segments":
            ids, labels = [], []
            for _, trained in s[1]:
                piece = plain[pi]
                pi += 1
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
            out.append(("text", ids, labels, False))
        elif kind == "prm":
            ids = list(plain[pi])
            pi += 1
            labels = [IGNORE] * len(ids)
            for value in s[3]:
                piece = plain[pi]
                pi += 1
                ids += piece
                labels += [IGNORE] * len(piece)
                if piece:
                    labels[-1] = value
            out.append(("text", ids, labels, False))
        elif kind == "prompt":
            out.append(("prompt", plain[pi], s[2]))
            pi += 1
    return out


def encode_specs(specs: list[tuple], info: TokenizerInfo) -> list[Any]:
    """Tokenize a batch of specs (see formats.py) in two batched tokenizer calls."""
    return assemble(specs, tokenize_texts(info, spec_texts(specs)), info)
