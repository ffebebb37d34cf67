"""`tunery eval`: loss and perplexity on the held-out rows, exact match of greedy answers (GSM8K's `####`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tunery.evaluate import answer_mode, eval_main, evaluate, extract_answer, sft_examples
from tunery.generate import Completion


def test_extract_answer():
    assert extract_answer("She sold 48/2 = 24 clips.\n#### 72", "gsm8k") == "72"
    assert extract_answer("so the total is 1,000.\n#### 1,000", "gsm8k") == "1000"
    assert extract_answer("The answer is 72.", "gsm8k") == "72"  # no marker: the last number
    assert extract_answer("thus \\boxed{\\frac{1}{2}} done", "boxed") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{ 12 }", "boxed") == "12"
    assert extract_answer("  Paris \n", "text") == "paris"
    assert extract_answer("no number here", "gsm8k") is None
    assert answer_mode("x #### 3") == "gsm8k" and answer_mode("\\boxed{3}") == "boxed" and answer_mode("3") == "text"


def test_sft_examples_cut_at_the_answer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    prompt = tok("Question: 2+2?\nAnswer:").input_ids
    answer = tok(" 4 #### 4").input_ids
    ex = sft_examples([{"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}], tok)
    assert ex == [{"prompt_ids": prompt, "reference": "4 #### 4"}]
    assert sft_examples([{"input_ids": answer, "labels": answer}], tok) == []  # completion data: no prompt


def _config(tmp_path, base, data, **extra):
    cfg = {"base_model": str(base), "datasets": [{"path": str(data), "type": "alpaca", "field_instruction": "question",
                                                   "field_output": "answer"}],
           "val_set_size": 6, "sequence_len": 512, "output_dir": str(tmp_path / "run"),
           "dataset_prepared_path": str(tmp_path / "prepared"), **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_eval_config_and_run(tiny_llama, gsm8k_small, tmp_path):
    from tunery.adapters import inject_lora, save_adapter
    from tunery.models import load_model

    path, cfg = _config(tmp_path, tiny_llama, gsm8k_small)
    r = evaluate(path, max_new_tokens=8, batch_size=4, progress=False)
    assert r["kind"] == "sft" and r["eval_documents"] == 6 and r["eval_tokens"] > 0
    assert math.isfinite(r["eval_loss"]) and r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
    assert r["exact_match_examples"] == 6 and r["answer_modes"] == ["gsm8k"]
    assert all(p["expected"] is not None for p in r["predictions"])
    assert json.loads((tmp_path / "run" / "eval-base.json").read_text())["eval_loss"] == r["eval_loss"]

    # the same rows through a run directory with an adapter: RUN/eval.json
    run = tmp_path / "run"
    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, ["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    save_adapter(lm.model, run / "adapter", str(tiny_llama))
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "adapter": "lora", "lora_target_modules": ["q_proj", "v_proj"]}))
    rc = eval_main(str(run), max_examples=3, max_new_tokens=4, batch_size=2)
    assert rc == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["eval_documents"] == 3 and res["eval_loss"] != r["eval_loss"]


def test_exact_match_counts_right_answers(tiny_llama, gsm8k_small, tmp_path, monkeypatch):
    """With a model that answers like the references, accuracy is 1; with one that is off by one, 0."""
    from tunery.generate import Generator

    rows = [json.loads(line) for line in open(gsm8k_small)]
    answers = {r["answer"].split("####")[-1].strip() for r in rows}
    shift = {"by": 0}

    def fake_generate(self, prompts, params=None, stream=None, seed=None):
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            row = next(r for r in rows if r["question"] in text)
            want = int(row["answer"].split("####")[-1].strip().replace(",", "")) + shift["by"]
            out.append(Completion(self.tokenizer(f"Reasoning...\n#### {want}").input_ids, "stop", len(p)))
        return out

    monkeypatch.setattr(Generator, "generate", fake_generate)
    path, _ = _config(tmp_path, tiny_llama, gsm8k_small)
    r = evaluate(path, progress=False, out=tmp_path / "e.json")
    assert r["exact_match"] == 1.0 and answers
    shift["by"] = 1
    r = evaluate(path, progress=False, out=tmp_path / "e.json")
    assert r["exact_match"] == 0.0


def test_no_eval_data_is_a_clear_error(tiny_llama, gsm8k_small, tmp_path):
    path, _ = _config(tmp_path, tiny_llama, gsm8k_small, val_set_size=0)
    with pytest.raises(ValueError, match="val_set_size"):
        evaluate(path, progress=False)
