"""Shared fixtures: the embedded model (converted once per machine), tiny random models, small data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """Print a failure's traceback the moment it happens, not only in the closing summary: a CI log that
    is cut (or a run stopped at its time limit) still says why each test failed."""
    if not report.failed:
        return
    tr = _config.pluginmanager.get_plugin("terminalreporter") if _config is not None else None
    if tr is None:
        return
    tr.write_line("")
    tr.write_line(f"---- FAILED {report.nodeid} ({report.when}) ----", red=True)
    text = report.longreprtext
    tr.write_line(text if len(text) <= 3000 else "...\n" + text[-3000:])


_config = None


def pytest_configure(config):
    global _config
    _config = config


@pytest.fixture(scope="session")
def smol_path() -> Path:
    """HF folder of the embedded SmolLM2-135M-Instruct (converted from its GGUF once, then cached)."""
    from tunery.models import resolve_model_path

    return resolve_model_path("default")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, request) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (so real text tokenizes).

    TUNERY_TEST_TOKENIZER (a folder with SmolLM2's tokenizer files) stands in for the embedded model on a
    machine that has no copy of it (the GPU machine: its 98 MB GGUF does not travel with the tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok_dir = os.environ.get("TUNERY_TEST_TOKENIZER") or request.getfixturevalue("smol_path")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def gsm8k_small(tmp_path_factory) -> Path:
    """48 GSM8K rows (question/answer) from ../shared/data, or the shipped sample."""
    src = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not src.is_file():
        src = REPO / "examples" / "data" / "gsm8k_sample.jsonl"
    out = tmp_path_factory.mktemp("data") / "gsm8k_small.jsonl"
    with open(src) as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= 48:
                break
            row = json.loads(line)
            g.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    return out
