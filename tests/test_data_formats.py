"""Row formats: alpaca, user-defined, completion, input_output, preference (incl. HH-RLHF), kto, prm, prompts."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tunery.config import load_config
from tunery.data import IGNORE, DataError, prepare_data


@pytest.fixture(scope="module")
def smol(smol_path):
    return AutoTokenizer.from_pretrained(str(smol_path))


@pytest.fixture(scope="module")
def plain_tok(smol_path):
    """SmolLM2's tokenizer without a chat template (a base model's)."""
    tok = AutoTokenizer.from_pretrained(str(smol_path))
    tok.chat_template = None
    return tok


def run(tmp_path, tok, rows, entry, **cfg):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_config({"datasets": [{"path": "d.jsonl", **entry}], "shuffle_merged_datasets": False,
                     "dataset_prepared_path": str(tmp_path / "prep"), **cfg})
    return prepare_data(c, tok, cfg_dir=tmp_path)


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_alpaca_uses_chat_template(tmp_path, smol):
    row = {"question": "What is 2+2?", "answer": "4"}
    d = run(tmp_path, smol, [row], {"type": "alpaca", "field_instruction": "question", "field_output": "answer"})
    r = d.train[0]
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert r["input_ids"] == list(smol.apply_chat_template(conv, tokenize=True, return_dict=False))
    assert trained_text(smol, r["input_ids"], r["labels"]) == "4<|im_end|>"


def test_alpaca_input_and_system(tmp_path, smol):
    row = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact."}
    r = run(tmp_path, smol, [row], {"type": "alpaca"}).train[0]
    assert smol.decode(r["input_ids"]) == ("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nAdd\n\n2 and 2"
                                           "<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")


def test_alpaca_classic_prompt_without_template(tmp_path, plain_tok):
    tok = plain_tok
    r = run(tmp_path, tok, [{"instruction": "Add 2 and 2", "output": "4"}], {"type": "alpaca"}).train[0]
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nAdd 2 and 2\n\n### Response:\n")
    assert r["input_ids"] == ids_of(tok, prompt + "4" + tok.eos_token)
    n_prompt = len(ids_of(tok, prompt))
    assert r["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:]


def test_user_defined_format(tmp_path, smol):
    entry = {"type": "user_defined", "field_instruction": "q", "field_output": "a", "format": "[INST] {q} ({topic}) [/INST] "}
    r = run(tmp_path, smol, [{"q": "Hi?", "topic": "greeting", "a": "Hello"}], entry).train[0]
    assert smol.decode(r["input_ids"]) == "[INST] Hi? (greeting) [/INST] Hello<|im_end|>"
    # " Hello" is one token holding the prompt's last space: a token that overlaps the response is trained.
    assert trained_text(smol, r["input_ids"], r["labels"]) == " Hello<|im_end|>"


def test_completion_trains_everything_and_chunks(tmp_path, smol):
    text = " ".join(f"word{i}" for i in range(300))
    d = run(tmp_path, smol, [{"text": text}, {"text": "short doc"}], {"type": "completion"}, sequence_len=64)
    full = ids_of(smol, text + "<|im_end|>")
    rows = [r["input_ids"] for r in d.train]
    rows.remove(ids_of(smol, "short doc<|im_end|>"))
    assert sum(rows, []) == full
    assert [len(r) for r in rows] == [64] * (len(full) // 64) + [len(full) % 64]
    assert all(r["labels"] == r["input_ids"] for r in d.train)
    assert d.stats["extra_chunks"] == len(rows) - 1 and d.stats["dropped"] == 0


def test_input_output_segments_exact(tmp_path, smol):
    segs = [{"text": "<|im_start|>user\nhi there", "label": False}, {"text": "<|im_end|>\n", "label": False},
            {"text": "<|im_start|>assistant\n", "label": False}, {"text": "Hello, friend!", "label": True},
            {"text": "<|im_end|>", "label": True}, {"text": "\n"}]
    r = run(tmp_path, smol, [{"segments": segs}], {"type": "input_output"}).train[0]
    expect_ids, expect_labels = [], []
    for s in segs:
        t = ids_of(smol, s["text"])
        expect_ids += t
        expect_labels += t if s.get("label") else [IGNORE] * len(t)
    assert r["input_ids"] == expect_ids and r["labels"] == expect_labels
    assert smol.decode(r["input_ids"]) == "".join(s["text"] for s in segs)  # nothing added
    assert trained_text(smol, r["input_ids"], r["labels"]) == "Hello, friend!<|im_end|>"


def test_preference_strings_and_messages(tmp_path, smol):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    d = run(tmp_path, smol, rows, {"type": "preference"})
    assert d.kind == "preference" and len(d.train) == 2
    a, b = d.train
    assert a == b
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert a["chosen_input_ids"] == list(smol.apply_chat_template(conv, tokenize=True, return_dict=False))
    assert trained_text(smol, a["chosen_input_ids"], a["chosen_labels"]) == "4<|im_end|>"
    assert trained_text(smol, a["rejected_input_ids"], a["rejected_labels"]) == "5<|im_end|>"
    n = next(i for i, x in enumerate(a["chosen_labels"]) if x != IGNORE)
    assert a["chosen_input_ids"][:n] == a["rejected_input_ids"][:n]


def test_preference_hh_transcripts(tmp_path, smol, plain_tok):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."}
    r = run(tmp_path, smol, [row], {"type": "preference"}).train[0]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "Knock knock."}]
    assert r["chosen_input_ids"] == list(smol.apply_chat_template(conv, tokenize=True, return_dict=False))
    assert trained_text(smol, r["chosen_input_ids"], r["chosen_labels"]) == "Knock knock.<|im_end|>"
    assert trained_text(smol, r["rejected_input_ids"], r["rejected_labels"]) == "No.<|im_end|>"
    # Without a chat template the transcript stays text: prompt up to the last "\n\nAssistant:".
    r = run(tmp_path, plain_tok, [row], {"type": "preference"}).train[0]
    assert plain_tok.decode(r["chosen_input_ids"]) == row["chosen"] + plain_tok.eos_token
    assert trained_text(plain_tok, r["chosen_input_ids"], r["chosen_labels"]) == " Knock knock." + plain_tok.eos_token


def test_kto(tmp_path, smol):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+2?", "completion": "5", "label": False}]
    d = run(tmp_path, smol, rows, {"type": "kto"})
    assert d.kind == "kto"
    a, b = d.train
    assert a["kto_label"] is True and b["kto_label"] is False
    gen = list(smol.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False))
    assert a["prompt_len"] == len(gen) and a["input_ids"][: a["prompt_len"]] == gen
    assert trained_text(smol, a["input_ids"], a["labels"]) == "4<|im_end|>"
    with pytest.raises(DataError, match=r"d\.jsonl: row 1: field 'label'.*boolean"):
        run(tmp_path, smol, [{"prompt": "p", "completion": "c", "label": 1}], {"type": "kto"})


def test_prm_labels_on_separators(tmp_path, smol):
    row = {"prompt": "Solve 2+2.", "completions": ["2+2=4", "so 5"], "labels": [True, False]}
    d = run(tmp_path, smol, [row], {"type": "prm"})
    r = d.train[0]
    assert d.kind == "prm"
    prompt, s1, s2 = ids_of(smol, "Solve 2+2."), ids_of(smol, "2+2=4\n"), ids_of(smol, "so 5\n")
    assert r["input_ids"] == prompt + s1 + s2
    expect = [IGNORE] * (len(prompt) + len(s1) - 1) + [1] + [IGNORE] * (len(s2) - 1) + [0]
    assert r["labels"] == expect


def test_prompts_for_grpo(tmp_path, smol):
    rows = [{"prompt": "What is 2+2?", "answer": "4", "level": 1},
            {"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "3+3?"}], "answer": "6"}]
    d = run(tmp_path, smol, rows, {"type": "prompts"})
    assert d.kind == "prompts"
    a, b = d.train
    gen = smol.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)
    assert a["prompt_ids"] == list(gen) and a["columns"] == {"answer": "4", "level": 1}
    assert smol.decode(b["prompt_ids"]).endswith("<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert b["columns"] == {"answer": "6"}


def test_mixed_kinds_is_an_error(tmp_path, smol):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    cfg = load_config({"datasets": [{"path": "a.jsonl", "type": "alpaca"}, {"path": "p.jsonl", "type": "preference"}],
                       "dataset_prepared_path": str(tmp_path / "prep")})
    with pytest.raises(DataError, match="one kind"):
        prepare_data(cfg, smol, cfg_dir=tmp_path)


def test_unknown_type(tmp_path, smol):
    with pytest.raises(DataError, match="unknown"):
        run(tmp_path, smol, [{"a": 1}], {"type": "alpacka"})
