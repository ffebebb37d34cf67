"""Looking at the data: statistics, examples with trained and masked tokens told apart, jsonl dumps.

`tunery preprocess CONFIG [--debug N] [--dump FILE]` calls `preprocess`. In a terminal, trained text is
green and masked text grey; elsewhere trained text is wrapped in [[ ]] and masked text is left bare.
PRM step labels show as [+] / [-] after the token that carries them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from .packing import doc_lengths
from .pipeline import prepare_data
from .types import IGNORE

_GREEN, _GREY, _RED, _BOLD, _RESET = "\x1b[32m", "\x1b[90m", "\x1b[31m", "\x1b[1m", "\x1b[0m"


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render_tokens(tokenizer: Any, ids: list[int], labels: list[int] | None, color: bool, prm: bool = False) -> str:
    """Decode `ids` in runs of trained / masked tokens and mark the trained runs."""
    if labels is None:
        return _decode(tokenizer, ids)
    out: list[str] = []
    i, n = 0, len(ids)
    while i < n:
        if prm:
            j = i
            while j < n and labels[j] == IGNORE:
                j += 1
            if j > i:
                text = _decode(tokenizer, ids[i:j])
                out.append(f"{_GREY}{text}{_RESET}" if color else text)
            if j < n:
                text = _decode(tokenizer, [ids[j]])
                good = labels[j] == 1
                mark = ("+" if good else "-")
                out.append(f"{_GREY}{text}{_RESET}{_GREEN if good else _RED}[{mark}]{_RESET}" if color
                           else f"{text}[{mark}]")
                j += 1
            i = j
            continue
        trained = labels[i] != IGNORE
        j = i
        while j < n and (labels[j] != IGNORE) == trained:
            j += 1
        text = _decode(tokenizer, ids[i:j])
        if color:
            out.append(f"{_GREEN if trained else _GREY}{text}{_RESET}")
        else:
            out.append(f"[[{text}]]" if trained else text)
        i = j
    return "".join(out)


def examples(rows: list[dict[str, Any]], kind: str, n: int) -> list[dict[str, Any]]:
    """The first n examples; packed SFT/PRM rows are split back into their documents."""
    out: list[dict[str, Any]] = []
    for r in rows:
        if len(out) >= n:
            break
        if kind in ("sft", "prm") and "position_ids" in r:
            start = 0
            for length in doc_lengths(r["position_ids"]):
                if len(out) >= n:
                    break
                end = start + length
                out.append({"input_ids": r["input_ids"][start:end], "labels": r["labels"][start:end],
                            "position_ids": r["position_ids"][start:end]})
                start = end
        else:
            out.append(dict(r))
    return out


def render_row(row: dict[str, Any], tokenizer: Any, kind: str = "sft", color: bool = False) -> str:
    """One example as text with its trained tokens marked."""
    b, r = (_BOLD, _RESET) if color else ("", "")
    if kind == "preference":
        return (f"{b}chosen:{r}\n" + render_tokens(tokenizer, row["chosen_input_ids"], row["chosen_labels"], color)
                + f"\n{b}rejected:{r}\n"
                + render_tokens(tokenizer, row["rejected_input_ids"], row["rejected_labels"], color))
    if kind == "kto":
        label = "desirable" if row["kto_label"] else "undesirable"
        return (f"{b}label: {label}, prompt {row['prompt_len']} tokens{r}\n"
                + render_tokens(tokenizer, row["input_ids"], row["labels"], color))
    if kind == "prompts":
        cols = json.dumps(row.get("columns", {}), ensure_ascii=False, default=str)
        return render_tokens(tokenizer, row["prompt_ids"], None, color) + f"\n{b}columns:{r} {cols}"
    return render_tokens(tokenizer, row["input_ids"], row["labels"], color, prm=kind == "prm")


def preview(cfg: Any, tokenizer: Any, n: int = 5, *, cfg_dir: str | Path | None = None,
            color: bool = False) -> list[dict[str, Any]]:
    """The first n training examples (documents, even when packed), each with a `rendered` string."""
    data = prepare_data(cfg, tokenizer, cfg_dir=cfg_dir)
    out = examples(data.train, data.kind, n)
    for ex in out:
        ex["rendered"] = render_row(ex, tokenizer, data.kind, color)
    return out


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_stats(stats: dict[str, Any]) -> str:
    """Readable statistics (the dict prepare_data puts in PreparedData.stats)."""
    lines = []

    def block(s: dict[str, Any], title: str) -> None:
        tokens, trained = s.get("tokens", 0), s.get("trained_tokens", 0)
        share = f" ({100 * trained / tokens:.1f}% of tokens)" if tokens else ""
        lines.append(f"{title}: {_num(s.get('examples', 0))} examples from {_num(s.get('rows_read', 0))} rows read")
        lines.append(f"  tokens {_num(tokens)}, trained tokens {_num(trained)}{share}")
        lines.append(f"  dropped {_num(s.get('dropped', 0))} (too long {_num(s.get('dropped_too_long', 0))}, "
                     f"no trained tokens {_num(s.get('dropped_no_trained_tokens', 0))}), "
                     f"truncated {_num(s.get('truncated', 0))}, skipped {_num(s.get('skipped', 0))}")
        if s.get("extra_chunks"):
            lines.append(f"  long documents split into {_num(s['extra_chunks'])} extra chunks")
        eff = s.get("packing_efficiency")
        if eff is not None:
            lines.append(f"  {_num(s.get('rows', 0))} packed rows, packing efficiency {100 * eff:.1f}%")
        else:
            lines.append(f"  {_num(s.get('rows', 0))} rows (one example each, padding-free)")
        for msg in s.get("skipped_examples", []):
            lines.append(f"  skipped: {msg}")

    lines.append(f"kind: {stats.get('kind')}, sequence_len {stats.get('sequence_len')}")
    block(stats, "train")
    if isinstance(stats.get("eval"), dict):
        block(stats["eval"], "eval")
    lines.append(f"cache: {stats.get('cache')} ({stats.get('cache_path')}) in {stats.get('seconds')} s")
    return "\n".join(lines)


def preprocess(cfg: Any, debug: int = 0, dump: str | Path | None = None, stream: TextIO | None = None, *,
               cfg_dir: str | Path | None = None, tokenizer: Any) -> dict[str, Any]:
    """Tokenize and cache the data, print statistics (and `debug` examples), optionally dump the rows.

    The dump is jsonl, one final row per line: input_ids, labels and position_ids for SFT/PRM rows,
    the row's own fields for the other kinds. Returns the statistics dict. The caller loads the
    `tokenizer` (data/ does not import models/).
    """
    stream = stream if stream is not None else sys.stdout
    data = prepare_data(cfg, tokenizer, cfg_dir=cfg_dir)
    print(format_stats(data.stats), file=stream)
    if debug:
        color = bool(getattr(stream, "isatty", lambda: False)())
        for i, ex in enumerate(examples(data.train, data.kind, debug)):
            if data.kind == "prompts":
                head = f"prompt of {len(ex['prompt_ids'])} tokens"
            elif data.kind == "preference":
                head = f"chosen {len(ex['chosen_input_ids'])} tokens, rejected {len(ex['rejected_input_ids'])} tokens"
            else:
                trained = sum(1 for x in ex["labels"] if x != IGNORE)
                head = f"{len(ex['input_ids'])} tokens, {trained} labelled"
            print(f"\n--- example {i + 1}: {head} ---", file=stream)
            print(render_row(ex, tokenizer, data.kind, color), file=stream)
        if not color and data.kind != "prompts":
            print("\n(trained text is shown [[in double brackets]]; the rest is masked)", file=stream)
    if dump:
        path = Path(dump)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in data.train:
                if data.kind in ("sft", "prm"):
                    row = {"input_ids": row["input_ids"], "labels": row["labels"],
                           "position_ids": row.get("position_ids") or list(range(len(row["input_ids"])))}
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        print(f"wrote {len(data.train):,} rows to {path}", file=stream)
    return data.stats
