"""Which tokens end a completion: the tokenizer's eos plus the end-of-turn tokens of the common chat formats."""

from __future__ import annotations

from typing import Any

# end-of-turn markers of the chat formats in use (ChatML, Llama 3, Gemma, Phi-3, Mistral v7, DeepSeek, ...)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
               "</s>", "<|end_of_text|>", "<eos>", "<|end▁of▁sentence|>", "<turn|>")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def stop_token_ids(tokenizer: Any = None, model_config: Any = None, extra: list[int] | None = None) -> list[int]:
    """Sorted unique ids: eos of the tokenizer and of the model/generation config, end-of-turn tokens in
    the vocabulary, and `extra`."""
    ids: set[int] = set(_ids(extra))
    if model_config is not None:
        eos = model_config.get("eos_token_id") if isinstance(model_config, dict) else getattr(model_config, "eos_token_id", None)
        ids.update(_ids(eos))
    if tokenizer is not None:
        ids.update(_ids(getattr(tokenizer, "eos_token_id", None)))
        vocab = _vocab(tokenizer)
        for tok in END_OF_TURN:
            if tok in vocab:
                ids.add(int(vocab[tok]))
    return sorted(ids)


def _vocab(tokenizer: Any) -> dict[str, int]:
    try:
        return tokenizer.get_vocab()
    except Exception:
        return {}
