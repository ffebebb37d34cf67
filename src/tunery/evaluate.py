"""`tunery eval RUN|CONFIG`: eval loss and perplexity on the held-out data, and exact-match accuracy of greedy
answers against the references (GSM8K's `#### answer` convention and `\\boxed{}` built in).

The eval rows are the ones training held out (test_datasets, else the val_set_size split), prepared
by the same pipeline. For exact match each example is cut where its trained (answer) tokens begin:
the tokens before are the prompt exactly as training formatted it, the trained tokens are the
reference. GRPO prompt datasets give the prompt directly and the reference from their `answer`
column. Results go to RUN/eval.json (or OUTPUT_DIR/eval-base.json for a config: the untrained model).
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os
import re
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
REFERENCE_COLUMNS = ("answer", "reference", "solution", "target", "output", "label")


# ------------------------------------------------------------------ answers
def _boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 1, i + len("\\boxed{")
    start = j
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[start : j - 1] if depth == 0 else None


def _number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    n = nums[-1].replace(",", "").rstrip(".")
    try:
        v = float(n)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def extract_answer(text: str, mode: str) -> str | None:
    """The final answer in `text`: after the last `####` (gsm8k), inside the last \\boxed{} (boxed), or the
    whole text normalised (text). For gsm8k and boxed, numbers compare as numbers (1,000 == 1000.0)."""
    if mode == "gsm8k":
        if "####" in text:
            tail = text.rsplit("####", 1)[1].strip().split("\n")[0]
            return _number(tail) or (tail.strip() or None)
        boxed = _boxed(text)
        return _number(boxed) if boxed is not None else _number(text)  # a model that skipped the marker
    if mode == "boxed":
        boxed = _boxed(text)
        if boxed is None:
            return None
        return _number(boxed) if _NUMBER.fullmatch(boxed.strip().replace(",", "")) else " ".join(boxed.split())
    return " ".join(text.split()).strip().lower() or None


def answer_mode(reference: str) -> str:
    if "####" in reference:
        return "gsm8k"
    if "\\boxed{" in reference:
        return "boxed"
    return "text"


# ------------------------------------------------------------------ examples
def _documents(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Packed rows back into their documents (position_ids restart at 0 for each)."""
    docs = []
    for r in rows:
        pos = r.get("position_ids")
        if not pos:
            docs.append(r)
            continue
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for s, e in zip(starts[:-1], starts[1:]):
            docs.append({"input_ids": r["input_ids"][s:e], "labels": r["labels"][s:e]})
    return docs


def _last_trained_span(labels: list[int]) -> tuple[int, int] | None:
    end = max((i for i, v in enumerate(labels) if v != -100), default=-1)
    if end < 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return start, end + 1


def sft_examples(docs: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """(prompt ids, reference text) from each document: the prompt ends where its last trained span begins."""
    out = []
    for d in docs:
        span = _last_trained_span(d["labels"])
        if span is None or span[0] == 0:
            continue  # nothing trained, or trained from the first token (completion data: no prompt)
        ref = tokenizer.decode(d["input_ids"][span[0] : span[1]], skip_special_tokens=True)
        out.append({"prompt_ids": list(d["input_ids"][: span[0]]), "reference": ref.strip()})
    return out


def prompt_examples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        cols = r.get("columns") or {}
        ref = next((cols[c] for c in REFERENCE_COLUMNS if cols.get(c) is not None), None)
        if ref is not None:
            out.append({"prompt_ids": list(r["prompt_ids"]), "reference": str(ref).strip()})
    return out


# ------------------------------------------------------------------ loss
def eval_loss(model: Any, docs: list[dict[str, Any]], device: torch.device, batch_tokens: int = 16384,
              progress: bool = True) -> tuple[float, int]:
    """Mean next-token loss over the trained tokens (padding-free batches, documents kept apart)."""
    from tqdm.auto import tqdm

    from .data.collate import collate_sft
    from .kernels.cross_entropy import linear_cross_entropy
    from .methods.common import shifted_labels

    batches, cur, size = [], [], 0
    for d in docs:
        if cur and size + len(d["input_ids"]) > batch_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(d)
        size += len(d["input_ids"])
    if cur:
        batches.append(cur)
    total, count = 0.0, 0
    softcap = getattr(getattr(model, "cfg", None), "final_softcap", None)
    with torch.no_grad():
        for rows in tqdm(batches, desc="eval loss", unit="batch", disable=not progress, dynamic_ncols=True):
            b = collate_sft(rows)
            b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
            h = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"])
            labels = shifted_labels(b)
            total += float(linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head_weight, labels.reshape(-1),
                                                softcap=softcap))
            count += int((labels != -100).sum())
    return total / max(count, 1), count


# ------------------------------------------------------------------ exact match
def exact_match(model: Any, tokenizer: Any, examples: list[dict[str, Any]], max_new_tokens: int = 256,
                batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Greedy answers for every example, compared with its reference. Returns accuracy and predictions."""
    from tqdm.auto import tqdm

    from .generate import Generator, SamplingParams

    engine = Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    preds: list[dict[str, Any]] = []
    correct = 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]))  # similar lengths batch well
    bar = tqdm(total=len(examples), desc="exact match", unit="ex", disable=not progress, dynamic_ncols=True)
    results: dict[int, dict[str, Any]] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        outs = engine.generate([examples[i]["prompt_ids"] for i in idx], params)
        for i, o in zip(idx, outs):
            ref = examples[i]["reference"]
            mode = answer_mode(ref)
            text = tokenizer.decode(o.token_ids, skip_special_tokens=True)
            want, got = extract_answer(ref, mode), extract_answer(text, mode)
            ok = want is not None and got == want
            correct += ok
            results[i] = {"prediction": text, "reference": ref, "answer": got, "expected": want, "correct": bool(ok),
                          "mode": mode, "finish_reason": o.finish_reason}
        bar.update(len(idx))
        bar.set_postfix(acc=f"{correct / max(1, len(results)):.3f}")
    bar.close()
    preds = [results[i] for i in range(len(examples))]
    modes = sorted({p["mode"] for p in preds})
    return {"exact_match": correct / max(1, len(examples)), "exact_match_correct": correct,
            "exact_match_examples": len(examples), "answer_modes": modes, "predictions": preds}


# ------------------------------------------------------------------ entry points
def _is_config(target: str | Path) -> bool:
    p = Path(str(target))
    return p.is_file() and p.suffix in (".yaml", ".yml")


def _guess_cfg_dir(cfg: Any, run_dir: Path | None) -> Path | None:
    """Where the run's relative dataset paths resolve: the first of cwd, the run, its parent, and the folders
    the manifest's data files imply, in which every local dataset path exists."""
    entries = list(cfg.datasets or []) + list(cfg.test_datasets or [])
    rel = [e.path for e in entries if not Path(os.path.expanduser(e.path)).is_absolute()]
    cands: list[Path] = [Path.cwd()]
    if run_dir is not None:
        cands += [run_dir, run_dir.parent]
        man = run_dir / "manifest.json"
        if man.is_file():
            try:
                files = json.loads(man.read_text()).get("data", {}).get("files", {})
            except (OSError, ValueError):
                files = {}
            for f in files:
                for r in rel:
                    if f.endswith(r.lstrip("./")):
                        cands.append(Path(f[: len(f) - len(r.lstrip("./"))]))
    def found(c: Path, r: str) -> bool:
        if any(ch in r for ch in "*?["):
            return bool(globlib.glob(str(c / r), recursive=True))
        return (c / r).exists()

    for c in cands:
        if all(found(c, r) for r in rel):
            return c
    return None  # prepare_data resolves against the current folder and says which path is missing


def evaluate(target: str | Path, *, overrides: list[str] | None = None, max_examples: int | None = None,
             max_new_tokens: int = 256, batch_size: int = 16, device: str | None = None, dtype: str | None = None,
             progress: bool = True, exact: bool = True, out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run (its trained model, its held-out data) or a config (its base model, untrained).

    Returns the results and writes them as JSON: `out`, else RUN/eval.json, else OUTPUT_DIR/eval-base.json.
    """
    from .config import load_config
    from .data import prepare_data
    from .inference import describe_target, load_for_inference

    t0 = time.perf_counter()
    if _is_config(target):
        cfg = load_config(target, overrides)
        cfg_dir = Path(target).resolve().parent
        model, tokenizer, info = load_for_inference(cfg.base_model, device=device, dtype=dtype)
        if cfg.lora_model_dir:
            from .adapters import load_adapter

            load_adapter(model, cfg.lora_model_dir)
        default_out = Path(cfg.output_dir) / "eval-base.json"  # output_dir is relative to the current folder, as in training
        what = f"config {target} (base model {cfg.base_model}, untrained)"
    else:
        d = describe_target(target)
        if d["config"] is None or isinstance(d["config"], dict):
            raise ValueError(f"{target}: not a run directory with a config.yaml, nor a config file; eval needs the "
                             "run's config to find its held-out data")
        cfg = load_config(d["config"], overrides) if overrides else d["config"]
        cfg_dir = _guess_cfg_dir(cfg, d["run_dir"])
        model, tokenizer, info = load_for_inference(target, device=device, dtype=dtype)
        default_out = Path(d["run_dir"]) / "eval.json"
        what = f"run {d['run_dir']} ({info['description']})"
    dev = info["device"]
    if not cfg.test_datasets and not cfg.val_set_size:
        raise ValueError("no held-out data to evaluate on: set val_set_size (e.g. 0.05, the split training holds "
                         "out) or test_datasets in the config (for a finished run, in RUN/config.yaml)")
    data = prepare_data(cfg, tokenizer, for_eval_only=True, cfg_dir=cfg_dir)
    rows = data.eval or []
    if not rows:
        raise ValueError("the held-out data is empty after preprocessing (all rows dropped as too long?)")
    results: dict[str, Any] = {"target": str(target), "model": what, "kind": data.kind}
    if data.kind == "prompts":
        examples = prompt_examples(rows)[: max_examples or None]
        docs: list[dict[str, Any]] = []
    else:
        docs = _documents(rows)[: max_examples or None]
        examples = sft_examples(docs, tokenizer) if data.kind == "sft" else []
    model.eval()
    if data.kind == "sft" and docs:
        loss, n_tok = eval_loss(model, docs, dev, progress=progress)
        results.update(eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)), eval_tokens=n_tok, eval_documents=len(docs))
    if exact and examples:
        em = exact_match(model, tokenizer, examples, max_new_tokens, batch_size, progress)
        results.update(em)
    elif exact:
        results["exact_match"] = None
        results["exact_match_note"] = "no examples with a prompt and a reference answer"
    results["seconds"] = round(time.perf_counter() - t0, 2)
    path = Path(out) if out is not None else default_out
    write_text(path, json.dumps(results, indent=2, ensure_ascii=False))
    results["path"] = str(path)
    return results


def format_results(r: dict[str, Any]) -> str:
    lines = [r["model"]]
    if "eval_loss" in r:
        lines.append(f"eval loss {r['eval_loss']:.4f}  perplexity {r['eval_ppl']:.3f}  "
                     f"({r['eval_tokens']} tokens, {r['eval_documents']} documents)")
    if r.get("exact_match") is not None:
        lines.append(f"exact match {r['exact_match']:.4f}  ({r['exact_match_correct']}/{r['exact_match_examples']}, "
                     f"answers: {', '.join(r['answer_modes'])})")
    elif "exact_match_note" in r:
        lines.append(f"exact match: {r['exact_match_note']}")
    lines.append(f"written to {r['path']}")
    return "\n".join(lines)


def eval_main(target: str | Namespace, max_examples: int | None = None, max_new_tokens: int = 256,
              batch_size: int = 16, overrides: list[str] | None = None, out: str | None = None) -> int:
    """`tunery eval RUN|CONFIG [--max-examples N] [--max-new-tokens N] [--batch-size N]`; prints a summary."""
    if isinstance(target, Namespace):
        ns = target
        target, max_examples = ns.target, getattr(ns, "max_examples", max_examples)
        max_new_tokens, batch_size = getattr(ns, "max_new_tokens", max_new_tokens), getattr(ns, "batch_size", batch_size)
        overrides, out = getattr(ns, "overrides", overrides), getattr(ns, "out", out)
    r = evaluate(target, overrides=overrides, max_examples=max_examples, max_new_tokens=max_new_tokens,
                 batch_size=batch_size, out=out)
    print(format_results(r))
    return 0


__all__ = ["answer_mode", "eval_main", "evaluate", "extract_answer", "format_results"]
