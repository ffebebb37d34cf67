"""Chat: render messages with the model's chat template, stream the reply, keep multi-turn history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .engine import Completion, Generator, engine_for
from .sampling import SamplingParams
from .streaming import TextStream

Message = dict[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`. Without a chat template (a base model) a plain transcript is used."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = []
    for m in messages:
        role = m["role"]
        parts.append(m["content"] if role == "system" else f"{role.capitalize()}: {m['content']}")
    text = "\n\n".join(parts)
    return text + ("\n\nAssistant:" if add_generation_prompt else "")


def chat_prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the rendered chat. The template writes any BOS itself, so none is added again."""
    text = render_chat(tokenizer, messages)
    add_special = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


class ChatSession:
    """Multi-turn chat over one model; `send()` appends the user turn and the reply to `messages`."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, params: SamplingParams | None = None,
                 generator: Generator | None = None):
        self.tokenizer = tokenizer
        self.engine = generator or engine_for(model, tokenizer)
        self.params = params or SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.9)
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.seed: int | None = None  # reproducible sampling: turn i uses seed + i

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `text`; `on_text(piece)` receives the reply as it is generated. Returns the whole reply."""
        self.messages.append({"role": "user", "content": text})
        ids = chat_prompt_ids(self.tokenizer, self.messages)
        stream = TextStream(self.tokenizer)

        def on_token(row: int, token_id: int) -> None:
            piece = stream.push(token_id)
            if piece and on_text is not None:
                on_text(piece)

        try:
            seed = None if self.seed is None else self.seed + len(self.messages)
            result: Completion = self.engine.generate([ids], self.params, stream=on_token, seed=seed)[0]
        except BaseException:
            self.messages.pop()  # an interrupted turn leaves no half of itself in the history
            raise
        tail = stream.flush()
        if tail and on_text is not None:
            on_text(tail)
        reply = self.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
