"""Row formats: each turns one raw row into a `Spec`, the text to tokenize and which parts of it are trained.

A format never tokenizes; it says what to tokenize and where the trained characters are, so all
formats share one batched tokenization (tokenize.py). Malformed rows raise RowError(field, message).

Specs (plain tuples, cheap to send to worker processes):
  ("text", text, spans, chunk)             one document; spans are trained [start, end) characters;
                                           chunk=True splits long documents into sequence_len pieces
  ("segments", [(text, trained), ...])     pieces tokenized one by one and concatenated (input_output)
  ("prm", prompt, [step, ...], [0|1, ...]) prompt untrained; each step (separator included) tokenized
                                           on its own, its label on the step's last (separator) token
  ("pref", text_spans_chosen, text_spans_rejected)
  ("kto", text, spans, label)              prompt_len = index of the first trained token
  ("prompt", text, columns)                GRPO prompts: rendered prompt, other columns kept
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import DataError, RowError
from .templates import ChatRenderer

SFT_TYPES = {"alpaca", "chat_template", "sharegpt", "completion", "input_output", "user_defined"}
ALIASES = {
    "messages": "chat_template", "chatml": "chat_template", "conversation": "chat_template",
    "custom": "user_defined", "user-defined": "user_defined",
    "segments": "input_output", "template_free": "input_output",
    "text": "completion", "pretrain": "completion",
    "dpo": "preference", "orpo": "preference", "simpo": "preference", "rm": "preference",
    "stepwise_supervised": "prm", "grpo": "prompts",
}
KIND = {**{t: "sft" for t in SFT_TYPES}, "preference": "preference", "kto": "kto", "prm": "prm", "prompts": "prompts"}

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_SYSTEM = "{system}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_SYSTEM_NO_INPUT = "{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n"

# Role names found in the wild, mapped onto the ones chat templates know.
DEFAULT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                 "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                 "function": "tool", "ipython": "ipython"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def canonical_type(name: str) -> str:
    t = ALIASES.get(name, name)
    if t not in KIND:
        known = sorted(set(KIND) | set(ALIASES))
        hint = ""
        if "." in name:  # another trainer's "template.strategy" names (chatml.intel, llama3.argilla, ...)
            template = name.split(".", 1)[0]
            hint = (f". {name!r} looks like another trainer's template.strategy name: describe the rows instead, "
                    "e.g. type: preference with field_prompt / field_chosen / field_rejected naming your columns"
                    + (f", and chat_template: {template}" if template not in ("chat_template", "user_defined") else ""))
        raise DataError(f"dataset type {name!r} is unknown; known types: {', '.join(known)}{hint}")
    return t


@dataclass
class Context:
    """What a format needs besides the row: the dataset entry, the chat renderer, the tokenizer's strings."""

    entry: Any
    type: str
    renderer: ChatRenderer | None
    bos: str  # prepended to documents that are not rendered by a chat template ("" if the tokenizer adds none)
    eos: str
    train_on_inputs: bool
    system_message: str | None
    roles_to_train: frozenset[str]
    train_on_eos: str
    roles: dict[str, str]


# ------------------------------------------------------------------------------------------------ fields


def _get(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError(name, f"missing (the row has {', '.join(map(str, row)) or 'no fields'})")
    return row[name]


def _str(row: dict[str, Any], name: str) -> str:
    v = _get(row, name)
    if not isinstance(v, str):
        raise RowError(name, f"expected a string, got {type(v).__name__} {_short(v)}")
    return v


def _opt_str(row: dict[str, Any], name: str | None) -> str:
    if not name or row.get(name) is None:
        return ""
    v = row[name]
    if not isinstance(v, str):
        raise RowError(name, f"expected a string, got {type(v).__name__} {_short(v)}")
    return v


def _bool(row: dict[str, Any], name: str) -> bool:
    v = _get(row, name)
    if not isinstance(v, bool):
        raise RowError(name, f"expected a boolean (true/false), got {type(v).__name__} {_short(v)}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _with_eos(text: str, eos: str) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def _with_bos(text: str, bos: str) -> str:
    return text if not bos or text.startswith(bos) else bos + text


# ------------------------------------------------------------------------------------------------ messages


def _messages(value: Any, field: str, ctx: Context, mapping: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A list of {role, content, ...} dicts, with mapped property names and roles; `train` kept."""
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {type(value).__name__} {_short(value)}")
    if not value:
        raise RowError(field, "empty conversation (no messages)")
    m = mapping or {}
    role_key, content_key = m.get("role", "role"), m.get("content", "content")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RowError(where, f"expected a message object, got {type(msg).__name__} {_short(msg)}")
        role = msg.get(role_key)
        if not isinstance(role, str):
            raise RowError(f"{where}.{role_key}", "missing" if role is None else f"expected a string, got {_short(role)}")
        content = msg.get(content_key)
        if content is None and not msg.get("tool_calls"):
            raise RowError(f"{where}.{content_key}", "missing")
        if content is not None and not isinstance(content, (str, list)):
            raise RowError(f"{where}.{content_key}", f"expected a string, got {type(content).__name__} {_short(content)}")
        new = {k: v for k, v in msg.items() if k not in (role_key, content_key, "train", "weight")}
        new["role"] = ctx.roles.get(role, ctx.roles.get(role.lower(), role))
        new["content"] = content if content is not None else ""
        if "train" in msg and msg["train"] is not None:
            if not isinstance(msg["train"], bool):
                raise RowError(f"{where}.train", f"expected a boolean, got {_short(msg['train'])}")
            new["train"] = msg["train"]
        elif "weight" in msg and msg["weight"] is not None:
            if msg["weight"] not in (0, 1) or isinstance(msg["weight"], float) and msg["weight"] not in (0.0, 1.0):
                raise RowError(f"{where}.weight", f"expected 0 or 1, got {_short(msg['weight'])}")
            new["train"] = bool(msg["weight"])
        out.append(new)
    return out


def _add_system(msgs: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}] + msgs
    return msgs


def _chat(msgs: list[dict[str, Any]], ctx: Context, field: str, trainable: list[bool] | None = None,
          train_all: bool | None = None) -> tuple:
    """Render a conversation; message k is trained by its `train` flag, else by its role."""
    if ctx.renderer is None:
        raise RowError(field, "message lists need a chat template, and the tokenizer has none: set chat_template "
                              "(chatml, llama3, gemma, ...) or chat_template: jinja with chat_template_jinja")
    train = []
    for k, m in enumerate(msgs):
        if trainable is not None:
            train.append(trainable[k])
        else:
            train.append(m.pop("train") if "train" in m else m["role"] in ctx.roles_to_train)
        m.pop("train", None)
    all_ = ctx.train_on_inputs if train_all is None else train_all
    return ctx.renderer.conversation(msgs, train, ctx.train_on_eos, train_all=all_)


def _plain(prompt: str, response: str, ctx: Context, train_all: bool | None = None) -> tuple[str, list]:
    """bos + prompt + response + eos with the response (and eos) trained."""
    head = _with_bos(prompt, ctx.bos)
    text = _with_eos(head + response, ctx.eos)
    all_ = ctx.train_on_inputs if train_all is None else train_all
    return text, [(0 if all_ else len(head), len(text))]


# ------------------------------------------------------------------------------------------------ formats


def fmt_alpaca(row: dict[str, Any], ctx: Context) -> tuple:
    e = ctx.entry
    if e.format:
        return fmt_user_defined(row, ctx)
    instruction = _str(row, e.field_instruction or "instruction")
    inp = _opt_str(row, e.field_input or "input")
    output = _str(row, e.field_output or "output")
    system = _opt_str(row, e.field_system or "system") or ctx.system_message or ""
    if ctx.renderer is not None:
        user = instruction + ("\n\n" + inp if inp else "")
        msgs = _add_system([{"role": "user", "content": user}, {"role": "assistant", "content": output}], system)
        text, spans = _chat(msgs, ctx, e.field_output or "output", [False] * (len(msgs) - 1) + [True])
        return ("text", text, spans, False)
    if system:
        tpl = ALPACA_SYSTEM if inp else ALPACA_SYSTEM_NO_INPUT
    else:
        tpl = ALPACA_PROMPT if inp else ALPACA_NO_INPUT
    prompt = tpl.format(instruction=instruction, input=inp, system=system)
    text, spans = _plain(prompt, output, ctx)
    return ("text", text, spans, False)


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        raise RowError(key, "missing (named in the dataset's format string)")


def fmt_user_defined(row: dict[str, Any], ctx: Context) -> tuple:
    """`format` / `no_input_format` strings over the row's columns; {instruction}, {input}, {system} and
    {output} name the columns given by field_instruction, field_input, field_system and field_output."""
    e = ctx.entry
    if not e.format:
        raise DataError(f"dataset {e.path}: type user_defined needs `format`, e.g. '[INST] {{instruction}} [/INST]'")
    f_out = e.field_output or "output"
    values = _Fields({k: v for k, v in row.items() if v is not None})
    values["instruction"] = _str(row, e.field_instruction or "instruction") if (
        e.field_instruction or "{instruction}" in e.format) else row.get("instruction", "")
    values["input"] = _opt_str(row, e.field_input or "input")
    values["system"] = _opt_str(row, e.field_system or "system") or ctx.system_message or ""
    output = _str(row, f_out)
    tpl = e.no_input_format if (e.no_input_format and not values["input"]) else e.format
    try:
        prompt = tpl.format_map(values)
    except (ValueError, IndexError) as err:
        raise DataError(f"dataset {e.path}: format string {tpl!r} is not valid: {err}") from None
    text, spans = _plain(prompt, output, ctx)
    return ("text", text, spans, False)


def fmt_chat_template(row: dict[str, Any], ctx: Context) -> tuple:
    e = ctx.entry
    field = e.field_messages or ("messages" if "messages" in row or "conversations" not in row else "conversations")
    mapping = dict(e.message_property_mappings or {})
    if ctx.type == "sharegpt":
        field = e.field_messages or "conversations"
        mapping = {"role": "from", "content": "value", **mapping}
    msgs = _messages(_get(row, field), field, ctx, mapping)
    msgs = _add_system(msgs, _opt_str(row, e.field_system) or ctx.system_message)
    text, spans = _chat(msgs, ctx, field)
    return ("text", text, spans, False)


def fmt_completion(row: dict[str, Any], ctx: Context) -> tuple:
    text = _with_eos(_with_bos(_str(row, ctx.entry.field or "text"), ctx.bos), ctx.eos)
    return ("text", text, [(0, len(text))], True)


def fmt_input_output(row: dict[str, Any], ctx: Context) -> tuple:
    field = ctx.entry.field or "segments"
    segs = _get(row, field)
    if not isinstance(segs, list) or not segs:
        raise RowError(field, "expected a non-empty list of {text, label} segments" if isinstance(segs, list)
                       else f"expected a list of segments, got {type(segs).__name__}")
    out = []
    for i, s in enumerate(segs):
        if not isinstance(s, dict):
            raise RowError(f"{field}[{i}]", f"expected a {{text, label}} object, got {_short(s)}")
        text = s.get("text")
        if not isinstance(text, str):
            raise RowError(f"{field}[{i}].text", "missing" if text is None else f"expected a string, got {_short(text)}")
        label = s.get("label", False)
        if label is None:
            label = False
        if not isinstance(label, bool):
            raise RowError(f"{field}[{i}].label", f"expected a boolean (true/false), got {_short(label)}")
        out.append((text, label or ctx.train_on_inputs))
    return ("segments", out)


# -- alignment formats -----------------------------------------------------------------------------------


def _to_prompt_messages(value: Any, field: str, ctx: Context) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, field, ctx)


def _to_response_messages(value: Any, field: str, ctx: Context) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _messages(value, field, ctx)


def _hh_messages(transcript: str, field: str) -> list[dict[str, Any]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> messages."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3:
        raise RowError(field, "expected a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    msgs = []
    for who, said in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if who == "Human" else "assistant", "content": said.strip()})
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()  # the prompt ends with "\n\nAssistant:", where the response goes
    if not msgs:
        raise RowError(field, "the transcript holds no turn before the last '\n\nAssistant:'")
    return msgs


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The shared prompt ends with the last '\\n\\nAssistant:' both transcripts have in common."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind("\n\nAssistant:", 0, n)
    while cut != -1 and cut + len("\n\nAssistant:") > n:
        cut = chosen.rfind("\n\nAssistant:", 0, cut)
    if cut == -1:
        raise RowError("chosen", "no prompt shared by chosen and rejected: expected both to be "
                                 "'\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts with a common beginning")
    end = cut + len("\n\nAssistant:")
    return chosen[:end], chosen[end:], rejected[end:]


def _preference_pair(row: dict[str, Any], ctx: Context, f_prompt: str, f_chosen: str,
                     f_rejected: str) -> tuple[list, list, list] | tuple[str, str, str]:
    """(prompt, chosen, rejected) as message lists (a chat template renders them) or as plain strings."""
    chosen, rejected = _get(row, f_chosen), _get(row, f_rejected)
    prompt = row.get(f_prompt)
    for name, v in ((f_chosen, chosen), (f_rejected, rejected)):
        if not isinstance(v, (str, list)):
            raise RowError(name, f"expected a string or a list of messages, got {type(v).__name__} {_short(v)}")
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            p, c, r = _split_hh(chosen, rejected)
            if ctx.renderer is None:
                return p, c, r
            return _hh_messages(p, f_chosen), [{"role": "assistant", "content": c.strip()}], \
                [{"role": "assistant", "content": r.strip()}]
        if isinstance(chosen, list) and isinstance(rejected, list):
            cm, rm = _messages(chosen, f_chosen, ctx), _messages(rejected, f_rejected, ctx)
            k = 0
            while k < min(len(cm), len(rm)) - 1 and cm[k] == rm[k]:
                k += 1
            if k == 0:
                raise RowError(f_prompt, "missing, and chosen/rejected share no leading messages to use as the prompt")
            return cm[:k], cm[k:], rm[k:]
        raise RowError(f_prompt, "missing (chosen and rejected without a prompt must both be HH-style transcripts "
                                 "or both message lists)")
    if not isinstance(prompt, (str, list)):
        raise RowError(f_prompt, f"expected a string or a list of messages, got {type(prompt).__name__}")
    if ctx.renderer is None and isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected
    return (_to_prompt_messages(prompt, f_prompt, ctx), _to_response_messages(chosen, f_chosen, ctx),
            _to_response_messages(rejected, f_rejected, ctx))


def _side(prompt: Any, response: Any, ctx: Context, field: str) -> tuple[str, list]:
    """Text and trained spans of prompt + one response (only the response is trained)."""
    if isinstance(prompt, str):
        return _plain(prompt, response, ctx, train_all=False)
    msgs = _add_system([dict(m) for m in prompt], ctx.system_message) + [dict(m) for m in response]
    n_prompt = len(msgs) - len(response)
    trainable = [False] * n_prompt + [m.get("train", m["role"] in ctx.roles_to_train) for m in response]
    return _chat(msgs, ctx, field, trainable, train_all=False)


def fmt_preference(row: dict[str, Any], ctx: Context) -> tuple:
    e = ctx.entry
    f_prompt, f_chosen, f_rejected = e.field_prompt or "prompt", e.field_chosen or "chosen", e.field_rejected or "rejected"
    prompt, chosen, rejected = _preference_pair(row, ctx, f_prompt, f_chosen, f_rejected)
    return ("pref", _side(prompt, chosen, ctx, f_chosen), _side(prompt, rejected, ctx, f_rejected))


def fmt_kto(row: dict[str, Any], ctx: Context) -> tuple:
    e = ctx.entry
    f_prompt, f_comp, f_label = e.field_prompt or "prompt", e.field_completion or "completion", e.field_label or "label"
    prompt, completion, label = _get(row, f_prompt), _get(row, f_comp), _bool(row, f_label)
    for name, v in ((f_prompt, prompt), (f_comp, completion)):
        if not isinstance(v, (str, list)):
            raise RowError(name, f"expected a string or a list of messages, got {type(v).__name__} {_short(v)}")
    if ctx.renderer is None and isinstance(prompt, str) and isinstance(completion, str):
        text, spans = _side(prompt, completion, ctx, f_comp)
    else:
        text, spans = _side(_to_prompt_messages(prompt, f_prompt, ctx),
                            _to_response_messages(completion, f_comp, ctx), ctx, f_comp)
    return ("kto", text, spans, label)


def fmt_prm(row: dict[str, Any], ctx: Context) -> tuple:
    e = ctx.entry
    f_prompt, f_steps, f_labels = e.field_prompt or "prompt", e.field_completion or "completions", e.field_label or "labels"
    prompt = _str(row, f_prompt)
    steps, labels = _get(row, f_steps), _get(row, f_labels)
    if not isinstance(steps, list) or not steps:
        raise RowError(f_steps, "expected a non-empty list of step strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise RowError(f_labels, f"expected a list of {len(steps)} booleans (one per step), got {_short(labels)}")
    sep = e.step_separator if e.step_separator is not None else "\n"
    out_steps, out_labels = [], []
    for i, (s, lab) in enumerate(zip(steps, labels)):
        if not isinstance(s, str):
            raise RowError(f"{f_steps}[{i}]", f"expected a string, got {_short(s)}")
        if not isinstance(lab, bool):
            raise RowError(f"{f_labels}[{i}]", f"expected a boolean (true/false), got {_short(lab)}")
        out_steps.append(s + sep)
        out_labels.append(int(lab))
    return ("prm", _with_bos(prompt, ctx.bos), out_steps, out_labels)


def fmt_prompts(row: dict[str, Any], ctx: Context) -> tuple:
    e = ctx.entry
    f_prompt = e.field_prompt or "prompt"
    prompt = _get(row, f_prompt)
    columns = {k: v for k, v in row.items() if k != f_prompt}
    if isinstance(prompt, str) and ctx.renderer is None:
        return ("prompt", _with_bos(prompt, ctx.bos), columns)
    if not isinstance(prompt, (str, list)):
        raise RowError(f_prompt, f"expected a string or a list of messages, got {type(prompt).__name__}")
    msgs = _add_system(_to_prompt_messages(prompt, f_prompt, ctx), ctx.system_message)
    if ctx.renderer is None:
        raise RowError(f_prompt, "message lists need a chat template, and the tokenizer has none")
    for m in msgs:
        m.pop("train", None)
    return ("prompt", ctx.renderer.prompt(msgs), columns)


FORMATS: dict[str, Callable[[dict[str, Any], Context], tuple]] = {
    "alpaca": fmt_alpaca, "user_defined": fmt_user_defined, "chat_template": fmt_chat_template,
    "sharegpt": fmt_chat_template, "completion": fmt_completion, "input_output": fmt_input_output,
    "preference": fmt_preference, "kto": fmt_kto, "prm": fmt_prm, "prompts": fmt_prompts,
}
