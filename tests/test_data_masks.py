"""Exact label masks for chat templates (ChatML, Llama-3-style, Gemma-style), found by rendering.

Expected ids and labels are built independently: the conversation is written out by hand as pieces
(text, trained?), each piece tokenized on its own; the ids must also equal apply_chat_template's.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tunery.config import load_config
from tunery.data import IGNORE, prepare_data

LLAMA3_STYLE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def smol(smol_path):
    return AutoTokenizer.from_pretrained(str(smol_path))


def _variant(smol_path, template: str, bos: str, eos: str, extra: list[str]):
    tok = AutoTokenizer.from_pretrained(str(smol_path))
    tok.add_special_tokens({"additional_special_tokens": [bos, eos, *extra]})
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def llama3_tok(smol_path):
    return _variant(smol_path, LLAMA3_STYLE, "<|begin_of_text|>", "<|end_of_text|>",
                    ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


@pytest.fixture(scope="module")
def gemma_tok(smol_path):
    return _variant(smol_path, GEMMA_STYLE, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"])


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    return ids, labels


def chat_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))


def run(tmp_path, tok, rows, **cfg_extra):
    entry = {"path": "data.jsonl", "type": "chat_template", **cfg_extra.pop("entry", {})}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({"datasets": [entry], "shuffle_merged_datasets": False, "sequence_len": 4096,
                       "dataset_prepared_path": str(tmp_path / "prep"), **cfg_extra})
    return prepare_data(cfg, tok, cfg_dir=tmp_path)


CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


def test_chatml_smollm2_multi_turn(tmp_path, smol):
    sys_ = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    pieces = [
        (sys_ + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("It is 4.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
        ("It is 6.<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels = expected(smol, pieces)
    assert ids == chat_ids(smol, CONV)
    data = run(tmp_path, smol, [{"messages": CONV}])
    row = data.train[0]
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    assert row["position_ids"] == list(range(len(ids)))
    assert data.kind == "sft"


def test_llama3_style_eot_is_trained_not_eos(tmp_path, llama3_tok):
    tok = llama3_tok
    conv = [{"role": "system", "content": "Be brief."}] + [dict(m) for m in CONV]
    conv[2]["content"] = "  It is 4.  \n"  # the template trims: the mask must follow the trimmed text
    # "\n\n" before text is two "\n" tokens in this vocab (alone it would be one), hence the split pieces.
    pieces = [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n", False), ("\n", False),
        ("It is 4.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n", False), ("\n", False),
        ("It is 6.<|eot_id|>", True),
    ]
    ids, labels = expected(tok, pieces)
    assert ids == chat_ids(tok, conv)
    row = run(tmp_path, tok, [{"messages": conv}]).train[0]
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id and [x for x in row["labels"] if x == eot] == [eot, eot]
    assert row["input_ids"].count(tok.bos_token_id) == 1


def test_gemma_style(tmp_path, gemma_tok):
    tok = gemma_tok
    pieces = [
        ("<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", False),
        ("It is 4.<end_of_turn>", True),
        ("\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n", False),
        ("It is 6.<end_of_turn>", True),
        ("\n", False),
    ]
    ids, labels = expected(tok, pieces)
    assert ids == chat_ids(tok, CONV)
    row = run(tmp_path, tok, [{"messages": CONV}]).train[0]
    assert row["input_ids"] == ids
    assert row["labels"] == labels


@pytest.mark.parametrize("mode, trained_runs", [
    ("turn", ["It is 4.<end_of_turn>", "It is 6.<end_of_turn>"]),
    ("none", ["It is 4.", "It is 6."]),
    ("last", ["It is 4.", "It is 6.<end_of_turn>"]),
    ("all", ["<end_of_turn>", "It is 4.<end_of_turn>", "<end_of_turn>", "It is 6.<end_of_turn>"]),
])
def test_train_on_eos(tmp_path, gemma_tok, mode, trained_runs):
    row = run(tmp_path, gemma_tok, [{"messages": CONV}], entry={"train_on_eos": mode}).train[0]
    assert _runs(gemma_tok, row) == trained_runs


def _runs(tok, row) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    out, cur = [], []
    for i, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def test_roles_to_train_and_per_message_flag(tmp_path, llama3_tok):
    conv = [dict(m) for m in CONV]
    conv[1]["train"] = False  # first answer not trained, whatever its role says
    row = run(tmp_path, llama3_tok, [{"messages": conv}], entry={"roles_to_train": ["user", "assistant"]}).train[0]
    assert _runs(llama3_tok, row) == ["What is 2+2?<|eot_id|>", "And 3+3?<|eot_id|>", "It is 6.<|eot_id|>"]


def test_property_mappings_and_roles(tmp_path, smol):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    row = run(tmp_path, smol, [{"dialog": conv}], entry={
        "field_messages": "dialog", "message_property_mappings": {"role": "from", "content": "value"}}).train[0]
    assert _runs(smol, row) == ["Hello.<|im_end|>"]
    assert row["input_ids"] == chat_ids(smol, [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello."}])


def test_sharegpt(tmp_path, smol):
    conv = [{"from": "system", "value": "Sys."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]
    row = run(tmp_path, smol, [{"conversations": conv}], entry={"type": "sharegpt"}).train[0]
    assert _runs(smol, row) == ["Yo.<|im_end|>"]
    assert smol.decode(row["input_ids"]).startswith("<|im_start|>system\nSys.<|im_end|>")


def test_train_on_inputs_trains_everything(tmp_path, smol):
    row = run(tmp_path, smol, [{"messages": CONV}], train_on_inputs=True).train[0]
    assert row["labels"] == row["input_ids"]


def test_named_template_on_tokenizer_without_one(tmp_path, smol_path):
    tok = AutoTokenizer.from_pretrained(str(smol_path))
    tok.chat_template = None
    row = run(tmp_path, tok, [{"messages": CONV}], chat_template="chatml").train[0]
    assert _runs(tok, row) == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>user\nWhat is 2+2?")


def test_jinja_template_from_config(tmp_path, smol):
    row = run(tmp_path, smol, [{"messages": CONV}], chat_template="jinja",
              chat_template_jinja="{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}<|endoftext|>"
                                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}").train[0]
    assert _runs(smol, row) == [" It is 4.<|endoftext|>", " It is 6.<|endoftext|>"]


def test_never_doubled_bos(tmp_path, smol_path):
    """A tokenizer that adds bos itself and a template that writes bos_token: one bos."""
    from tokenizers.processors import TemplateProcessing

    tok = _variant(smol_path, LLAMA3_STYLE, "<|begin_of_text|>", "<|end_of_text|>",
                   ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                              special_tokens=[("<|begin_of_text|>", bos)])
    assert tok("hi")["input_ids"][0] == bos
    row = run(tmp_path, tok, [{"messages": CONV}]).train[0]
    assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
    # Without a template (classic alpaca prompt) the bos the tokenizer wants is added once, eos once.
    tok.chat_template = None
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Say hi", "output": "hi<|end_of_text|>"}) + "\n")
    cfg = load_config({"datasets": [{"path": "a.jsonl", "type": "alpaca"}], "dataset_prepared_path": str(tmp_path / "p2")})
    row = prepare_data(cfg, tok, cfg_dir=tmp_path).train[0]
    assert row["input_ids"].count(bos) == 1 and row["input_ids"][0] == bos
    assert row["input_ids"].count(tok.eos_token_id) == 1 and row["input_ids"][-1] == tok.eos_token_id
    assert row["labels"][-1] == tok.eos_token_id


def test_mask_matches_transformers_generation_tags(tmp_path, smol_path):
    """An independent oracle: transformers' assistant mask from {% generation %} tags in the template."""
    tok = AutoTokenizer.from_pretrained(str(smol_path))
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    convs = [CONV, CONV[:2], [{"role": "system", "content": "Sys"}] + CONV,
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  spaced  \n"},
              {"role": "user", "content": "y"}, {"role": "assistant", "content": "é😀 unicode ✓"}]]
    data = run(tmp_path, tok, [{"messages": c} for c in convs])
    for conv, row in zip(convs, data.train):
        ref = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert row["input_ids"] == list(ref["input_ids"])
        assert [int(lab != IGNORE) for lab in row["labels"]] == list(ref["assistant_masks"])


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral", "phi3", "smollm2", "inspecting"])
def test_last_turn_shortcut_agrees_with_general_path(smol, name):
    """The last answer's span found from a per-shape skeleton equals the one from re-rendering."""
    from tunery.data.templates import BUILTIN, ChatRenderer
    from tunery.data.tokenize import TokenizerInfo

    info = TokenizerInfo(smol)
    text = {"smollm2": smol.chat_template,
            "inspecting": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                          "{% if m['content'].endswith('?') %}{{ ' (question)' }}{% endif %}{{ '<|im_end|>\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
            }.get(name) or BUILTIN[name]
    fast = ChatRenderer(text, info.template_kwargs, info.specials)
    slow = ChatRenderer(text, info.template_kwargs, info.specials)
    slow._anchored = lambda messages, full: None
    answers = ["It is 4.", "  padded  \n", "Why?", "assistant", "<|im_end|>", "\x00TUNERY1\x00", "x\n\n", "4 <|im_end|> 5"]
    for answer in answers:
        for conv in (CONV[:1], CONV[:3], [{"role": "system", "content": "S"}] + CONV[:1]):
            msgs = [dict(m) for m in conv] + [{"role": "assistant", "content": answer}]
            train = [m["role"] == "assistant" for m in msgs]
            for eos in ("turn", "none"):
                assert fast.conversation(msgs, train, eos) == slow.conversation(msgs, train, eos), (answer, eos)


def test_gsm8k_sample_ids_equal_apply_chat_template(tmp_path, smol):
    """The real quickstart data: every row tokenizes exactly as apply_chat_template does (batched, with the
    shared system prompt tokenized once), and only the answer plus <|im_end|> is trained."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "examples" / "data" / "gsm8k_sample.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()][:200]
    cfg = load_config({"datasets": [{"path": str(sample), "type": "alpaca", "field_instruction": "question",
                                     "field_output": "answer"}], "shuffle_merged_datasets": False,
                       "dataset_prepared_path": str(tmp_path / "prep")})
    data = prepare_data(cfg, smol)
    assert len(data.train) == 500
    for r, row in zip(rows, data.train):
        conv = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        assert row["input_ids"] == chat_ids(smol, conv)
        assert _runs(smol, row) == [r["answer"] + "<|im_end|>"]


QWEN3_STYLE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' %}{%- set ns.last_query_index = index %}{%- break %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_qwen3_style_history_differs_from_last_turn(tmp_path, smol_path):
    """Reasoning kept only in the last turn, an empty <think> block added there: the template renders a
    turn differently once more turns follow. The last answer is trained from the generation prompt on
    (the <think> block is what the model writes), earlier answers as they appear in the history."""
    tok = AutoTokenizer.from_pretrained(str(smol_path))
    tok.chat_template = QWEN3_STYLE
    conv = [dict(m) for m in CONV]
    with_reasoning = [dict(m) for m in CONV]
    with_reasoning[1]["content"] = "<think>\nadd them\n</think>\n\nIt is 4."
    with_reasoning[3]["content"] = "<think>\nadd again\n</think>\n\nIt is 6."
    data = run(tmp_path, tok, [{"messages": conv}, {"messages": with_reasoning}])
    a, b = data.train
    assert a["input_ids"] == chat_ids(tok, conv) and b["input_ids"] == chat_ids(tok, with_reasoning)
    assert _runs(tok, a) == ["It is 4.<|im_end|>", "<think>\n\n</think>\n\nIt is 6.<|im_end|>"]
    assert _runs(tok, b) == ["It is 4.<|im_end|>", "<think>\nadd again\n</think>\n\nIt is 6.<|im_end|>"]
