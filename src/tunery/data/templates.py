"""Chat templates, and which characters of a rendered conversation are trained.

The label mask is found by rendering, never by per-template rules: the conversation is rendered whole,
and prefixes of it are rendered again (with and without the generation prompt, or with a turn's content
emptied); where the renderings agree and differ tells where each turn's header, content and end-of-turn
marker lie. A turn's end-of-turn token is the first special token after its content (<|im_end|>,
<|eot_id|>, <end_of_turn>, </s>, ...), whether or not it is the tokenizer's eos.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import DataError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (sys if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
BUILTIN = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "phi3": PHI3}


def template_text(name: str | None, jinja: str | None, tokenizer: Any) -> str | None:
    """The Jinja source for `chat_template:` (None/tokenizer_default -> the tokenizer's own, maybe None)."""
    if name in (None, "", "tokenizer_default"):
        return getattr(tokenizer, "chat_template", None) or None
    if name == "jinja":
        if not jinja:
            raise DataError("chat_template: jinja needs chat_template_jinja (the template text)")
        return jinja
    if name in BUILTIN:
        return BUILTIN[name]
    if "{%" in name or "{{" in name:  # a template pasted straight into chat_template
        return name
    raise DataError(f"chat_template {name!r} is unknown; use tokenizer_default, {', '.join(BUILTIN)}, "
                    "or jinja with chat_template_jinja")


def compile_template(text: str) -> Any:
    """Compile like transformers does (same sandbox, filters and globals), so renderings match it."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(text)


def _lcp(a: str, b: str) -> int:
    """Length of the common prefix, by bisection over C-level slice compares."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _lcs(a: str, b: str) -> int:
    """Length of the common suffix."""
    return _lcp(a[::-1], b[::-1])


def special_pattern(strings: list[str]) -> re.Pattern[str]:
    longest_first = sorted({s for s in strings if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


class ChatRenderer:
    """Render conversations with one template and find the trained character spans."""

    def __init__(self, template: str, tokenizer_kwargs: dict[str, Any], specials: re.Pattern[str],
                 source: str = "chat template"):
        self.text = template
        self.compiled = compile_template(template)
        self.kwargs = tokenizer_kwargs
        self.specials = specials
        self.source = source
        self._skeletons: dict[tuple, tuple[str, str] | None] = {}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.kwargs)
        except Exception as e:  # jinja raise_exception() and template bugs alike
            raise TemplateFailure(f"the {self.source} failed to render this conversation: {e}") from None

    def conversation(self, messages: list[dict[str, Any]], train: list[bool], train_on_eos: str,
                     train_all: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and the trained [start, end) character spans.

        `train[k]` says whether message k's content is trained; `train_on_eos` says whose end-of-turn
        token is: turn (trained turns), all (every turn), last (the last trained turn), none.
        """
        full = self.render(messages)
        if train_all:
            return full, [(0, len(full))]
        trained = [k for k, t in enumerate(train) if t]
        if train_on_eos == "all":
            eos_turns = set(range(len(messages)))
        elif train_on_eos == "turn":
            eos_turns = set(trained)
        elif train_on_eos == "last":
            eos_turns = {trained[-1]} if trained else set()
        else:
            eos_turns = set()
        spans: list[tuple[int, int]] = []
        for k in sorted(set(trained) | eos_turns):
            lo, hi, bound = self._turn(messages, k, full)
            end = hi
            if k in eos_turns:
                end = self._eot_end(full, hi, bound)
            if not train[k]:
                lo = hi  # only its end-of-turn token
            if end > lo:
                spans.append((lo, end))
        return full, spans

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.render(messages, add_generation_prompt=True)

    # -- where message k lies in `full`: (content start, content end, end of the turn) -----------------
    def _turn(self, messages: list[dict[str, Any]], k: int, full: str) -> tuple[int, int, int]:
        """(start of the trained text, end of the content, end of the turn) of message k in `full`.

        An assistant turn is trained from where the generation prompt ends: what the model writes, the
        template's own additions (an empty <think></think> block, say) and the content. Other roles are
        trained from where their content starts. A template that renders a turn differently once later
        turns follow (history without reasoning, say) leaves the turn's end unknown: the end of `full`.
        """
        last = k == len(messages) - 1
        upto = full if last else self.render(messages[: k + 1])
        prefix_ok = last or full.startswith(upto)
        bound = len(upto) if prefix_ok else len(full)
        content = messages[k].get("content")
        text = content if isinstance(content, str) else None
        role = messages[k].get("role")
        if last and role == "assistant" and text:
            start = self._anchored(messages, full)
            if start is not None:
                return start, start + len(text), bound
        head = None
        if role == "assistant":
            gen = self.render(messages[:k], add_generation_prompt=True)
            if full.startswith(gen) and len(gen) <= bound:
                head = len(gen)
        if head is not None and text is not None:
            if full.startswith(text, head) and head + len(text) <= bound:
                return head, head + len(text), bound
            core = text.strip()
            if not core:
                return head, head, bound
            at = full.find(core, head, bound)
            if at != -1 and not full[head:at].strip():  # only whitespace between header and content
                return head, at + len(core), bound
        if prefix_ok:
            span = self._blank_diff(messages, k, upto)
            if span is not None:
                start, end = span
                if head is not None and head <= end:
                    start = head
                return start, end, bound
        # Last resort: the content runs from the header to the next special token.
        if head is None:
            before = self.render(messages[:k]) if k else ""
            if not full.startswith(before):
                return bound, bound, bound
            head = len(before)
            core = text.strip() if text else ""
            at = full.find(core, head, bound) if core else -1
            if at != -1:
                return at, at + len(core), bound
        m = self.specials.search(full, head, bound)
        return head, (m.start() if m else bound), bound

    def _blank_diff(self, messages: list[dict[str, Any]], k: int, upto: str) -> tuple[int, int] | None:
        """Where message k's content lies in `upto` (messages[:k+1] rendered), found by diffing against the
        same conversation with that content emptied: the common prefix ends where the content starts,
        the common suffix begins where it ends, whatever the template does to the content."""
        blank = dict(messages[k])
        blank["content"] = [] if isinstance(blank.get("content"), list) else ""
        try:
            empty = self.render(messages[:k] + [blank])
        except TemplateFailure:
            return None
        start = _lcp(upto, empty)
        tail = min(_lcs(upto, empty), len(empty) - start, len(upto) - start)
        return start, len(upto) - tail

    # -- the last turn without a second rendering --------------------------------------------------------
    def _anchored(self, messages: list[dict[str, Any]], full: str) -> int | None:
        """Start of the last message's content, when `full` ends exactly as this conversation shape's
        skeleton does (the template's text around the content, learnt once per shape by rendering
        placeholders) with the content literally in place. None sends the caller to the general path."""
        shape = tuple((m.get("role"), tuple(sorted(k for k in m if k != "content"))) for m in messages)
        if shape not in self._skeletons:
            if len(self._skeletons) > 512:
                self._skeletons.clear()
            self._skeletons[shape] = self._skeleton(messages)
        sk = self._skeletons[shape]
        if sk is None:
            return None
        header, trailer = sk
        content = messages[-1]["content"]
        end = len(full) - len(trailer)
        start = end - len(content)
        if (start - len(header) < 0 or not full.endswith(trailer) or not full.startswith(content, start)
                or not full.startswith(header, start - len(header))):
            return None
        return start

    def _skeleton(self, messages: list[dict[str, Any]]) -> tuple[str, str] | None:
        marks = [f"\x00TUNERY{i}\x00" for i in range(len(messages))]
        probe = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
        try:
            full = self.render(probe)
            gen = self.render(probe[:-1], add_generation_prompt=True)
        except TemplateFailure:
            return None
        at = [full.find(x) for x in marks]
        if any(full.count(x) != 1 for x in marks) or at != sorted(at):
            return None  # the template drops, repeats or reorders contents
        last = at[-1]
        if gen != full[:last]:
            return None  # the generation prompt is not what precedes the answer in the conversation
        prev_end = at[-2] + len(marks[-2]) if len(marks) > 1 else 0
        header, trailer = full[prev_end:last], full[last + len(marks[-1]):]
        if "\x00TUNERY" in header or "\x00TUNERY" in trailer:
            return None
        return header, trailer

    def _eot_end(self, full: str, content_end: int, bound: int) -> int:
        """End of the turn's end-of-turn marker: the first special token after the content; without one,
        the rest of the turn."""
        m = self.specials.search(full, content_end, bound)
        return m.end() if m else bound


class TemplateFailure(Exception):
    pass
