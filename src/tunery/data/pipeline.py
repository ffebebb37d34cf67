"""prepare_data: sources -> rows -> format -> tokenize + mask -> lengths -> pack -> cache.

The result is a PreparedData (types.py). It is cached under dataset_prepared_path keyed by a content
fingerprint: the sha256 of every source file, the tokenizer's own hash (vocab, merges, added tokens,
template), every setting that changes the rows, and the pipeline version. Names never enter the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cache as cache_mod
from .errors import DataError, RowError, row_error_message
from .formats import DEFAULT_ROLES, FORMATS, KIND, Context, canonical_type
from .packing import pack_rows, single_rows
from .sources import ResolvedSource, hub_hash, read, resolve
from .templates import ChatRenderer, TemplateFailure, template_text
from .tokenize import TokenizerInfo, assemble, spec_texts, tokenize_texts
from .types import IGNORE, PreparedData

PIPELINE_VERSION = 1
CHUNK = 1024  # rows per tokenizer call (and per worker task)
NEEDS_TEMPLATE = {"chat_template", "sharegpt"}
NO_TEMPLATE = {"completion", "input_output", "user_defined", "prm"}
_SKIP_EXAMPLES = 5


@dataclass
class Counters:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    chunks: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def add(self, other: Counters) -> None:
        for k, v in vars(other).items():
            if k == "skipped_examples":
                self.skipped_examples += v[: _SKIP_EXAMPLES - len(self.skipped_examples)]
            else:
                setattr(self, k, getattr(self, k) + v)


@dataclass
class Job:
    """Everything a worker needs to turn rows into documents (inherited by forked workers)."""

    rows: list[tuple[int, str, int, dict[str, Any]]]  # (entry index, source, 1-based row number, row)
    contexts: list[Context]
    info: TokenizerInfo
    kind: str
    sequence_len: int
    strategy: str
    skip_invalid: bool


_JOB: Job | None = None


# --------------------------------------------------------------------------------------------- entry point


def prepare_data(cfg: Any, tokenizer: Any, *, for_eval_only: bool = False, cfg_dir: str | Path | None = None,
                 use_cache: bool = True) -> PreparedData:
    """Tokenized, masked, packed rows for `cfg`, from the cache when nothing that matters changed.

    Relative dataset paths (and dataset_prepared_path) resolve against `cfg_dir` (the config file's
    folder), else the current folder. With `for_eval_only`, only eval rows are built: test_datasets when
    given, else the val_set_size split, else every row of `datasets`.
    """
    t0 = time.perf_counter()
    base = Path(cfg_dir).resolve() if cfg_dir is not None else Path.cwd()
    train_entries = list(cfg.datasets or [])
    test_entries = list(cfg.test_datasets or [])
    if for_eval_only and test_entries:
        train_entries = []
    if not train_entries and not test_entries:
        raise DataError("no datasets: add `datasets: [{path: data.jsonl, type: alpaca}]` to the config")
    kind = _kind_of(train_entries, test_entries)
    info = TokenizerInfo(tokenizer)
    train_src = [resolve(e, base) for e in train_entries]
    test_src = [resolve(e, base) for e in test_entries]
    files = {}
    for s in train_src + test_src:
        if s.hub is None:
            files.update(s.hashes)
        else:
            files[s.label] = hub_hash(s)
    fp = _fingerprint(cfg, info, train_entries, train_src, test_entries, test_src, for_eval_only)
    root = _cache_root(cfg, base)
    wait_for_cache_writes()
    if use_cache:
        hit = cache_mod.load(root, fp)
        if hit is not None:
            hit.stats = {**hit.stats, "cache": "hit", "cache_path": str(root / fp),
                         "seconds": round(time.perf_counter() - t0, 3)}
            return hit

    train_rows = _read_rows(train_entries, train_src, 0)
    test_rows = _read_rows(test_entries, test_src, len(train_entries))
    contexts = [_context(cfg, e, info) for e in train_entries + test_entries]

    rng = random.Random(cfg.seed)
    if test_entries:
        eval_rows: list | None = test_rows
        if for_eval_only:
            train_rows = []
    else:
        train_rows, eval_rows = _split(train_rows, cfg.val_set_size, rng)
        if for_eval_only:
            train_rows, eval_rows = [], (eval_rows if eval_rows else train_rows)
    if cfg.shuffle_merged_datasets:
        rng.shuffle(train_rows)

    n_proc = cfg.dataset_num_proc or 1
    train_docs, tc = _process(Job(train_rows, contexts, info, kind, cfg.sequence_len, cfg.excess_length_strategy,
                                  cfg.skip_invalid_rows), n_proc)
    eval_docs, ec = (None, None)
    if eval_rows is not None:
        eval_docs, ec = _process(Job(eval_rows, contexts, info, kind, cfg.sequence_len, cfg.excess_length_strategy,
                                     cfg.skip_invalid_rows), n_proc)
    packed = cfg.sample_packing and kind in ("sft", "prm")
    train = _rows_out(train_docs, kind, packed, cfg.sequence_len)
    ev = _rows_out(eval_docs, kind, packed, cfg.sequence_len) if eval_docs is not None else None
    if cfg.shuffle_merged_datasets and packed:
        random.Random(cfg.seed + 1).shuffle(train)

    stats = _stats(tc, train, kind, packed, cfg.sequence_len)
    if ec is not None and ev is not None:
        stats["eval"] = _stats(ec, ev, kind, packed, cfg.sequence_len)
    stats.update(kind=kind, sequence_len=cfg.sequence_len, sample_packing=packed)
    data = PreparedData(train=train, eval=ev, stats=stats, fingerprint=fp, files=files, kind=kind)
    data.stats["cache"] = "built"
    data.stats["seconds"] = round(time.perf_counter() - t0, 3)
    if use_cache:
        data.stats["cache_path"] = str(root / fp)
        _save_in_background(root, data)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            wait_for_cache_writes()  # other ranks read the cache right after this one built it
    return data


# The cache is written by a thread, so the caller goes on (loading the model, say) meanwhile. The write
# is atomic; a later prepare_data in this process waits for pending writes before it looks; the
# interpreter waits for the thread before it exits; under torchrun (WORLD_SIZE > 1) prepare_data
# returns only once the cache is written, so the other ranks find it.
_PENDING: list[threading.Thread] = []


def wait_for_cache_writes() -> None:
    while _PENDING:
        _PENDING.pop().join()


def _save_in_background(root: Path, data: PreparedData) -> None:
    # Copies of the row dicts: callers may add keys to rows (precomputed reference log-probs) meanwhile.
    snapshot = PreparedData(train=[dict(r) for r in data.train],
                            eval=None if data.eval is None else [dict(r) for r in data.eval],
                            stats=dict(data.stats), fingerprint=data.fingerprint, files=dict(data.files),
                            kind=data.kind)

    def write() -> None:
        try:
            cache_mod.save(root, snapshot)
        except OSError as e:
            warnings.warn(f"tunery: could not write the data cache under {root}: {e}", stacklevel=1)

    thread = threading.Thread(target=write, name="tunery-data-cache", daemon=False)
    thread.start()
    _PENDING.append(thread)


# --------------------------------------------------------------------------------------------- pieces


def _kind_of(train: list[Any], test: list[Any]) -> str:
    kinds: dict[str, str] = {}
    for label, entries in (("datasets", train), ("test_datasets", test)):
        for i, e in enumerate(entries):
            try:
                k = KIND[canonical_type(e.type)]
            except DataError as err:
                raise DataError(f"{label}[{i}] ({e.path}): {err}") from None
            kinds.setdefault(k, f"{label}[{i}] ({e.path}, type {e.type})")
    if len(kinds) > 1:
        desc = "; ".join(f"{k}: {where}" for k, where in kinds.items())
        raise DataError(f"the datasets of one run must all be of one kind, found {desc}. SFT formats (alpaca, "
                        "chat_template, sharegpt, completion, input_output, user_defined) cannot be mixed with "
                        "preference, kto, prm or prompts datasets")
    return next(iter(kinds))


def _cache_root(cfg: Any, base: Path) -> Path:
    if cfg.dataset_prepared_path:
        p = Path(os.path.expanduser(cfg.dataset_prepared_path))
        return p if p.is_absolute() else base / p
    return cache_mod.default_root()


def _fingerprint(cfg: Any, info: TokenizerInfo, train_entries: list, train_src: list[ResolvedSource],
                 test_entries: list, test_src: list[ResolvedSource], for_eval_only: bool) -> str:
    def entry_key(e: Any, s: ResolvedSource) -> dict[str, Any]:
        d = e.model_dump(mode="json")
        if s.hub is None:  # local: the content decides, not the names
            d.pop("path", None)
            d.pop("data_files", None)
            d["content"] = [s.hashes[str(f)] for f, _ in s.files]
            d["file_types"] = [k for _, k in s.files]
        else:
            d["content"] = hub_hash(s)
        return d

    key = {
        "pipeline": PIPELINE_VERSION, "cache_format": cache_mod.FORMAT_VERSION,
        "datasets": [entry_key(e, s) for e, s in zip(train_entries, train_src)],
        "test_datasets": [entry_key(e, s) for e, s in zip(test_entries, test_src)],
        "tokenizer": info.fingerprint(), "for_eval_only": for_eval_only,
        "settings": {k: getattr(cfg, k) for k in (
            "val_set_size", "shuffle_merged_datasets", "sequence_len", "sample_packing", "train_on_inputs",
            "excess_length_strategy", "skip_invalid_rows", "chat_template", "chat_template_jinja",
            "default_system_message", "seed")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _read_rows(entries: list[Any], sources: list[ResolvedSource], first_index: int) -> list[tuple]:
    rows: list[tuple] = []
    for i, src in enumerate(sources):
        for part in read(src):
            idx = first_index + i
            rows += [(idx, part.source, n, r) for n, r in zip(part.row_numbers, part.rows)]
    return rows


def _split(rows: list[tuple], size: float, rng: random.Random) -> tuple[list[tuple], list[tuple] | None]:
    if not size:
        return rows, None
    n = len(rows)
    n_val = int(size) if size >= 1 else max(1, round(n * size))
    if n_val >= n:
        raise DataError(f"val_set_size {size} holds out {n_val} of {n} rows, leaving none to train on; "
                        "lower val_set_size (a fraction < 1, or a row count)")
    held = set(rng.sample(range(n), n_val))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _context(cfg: Any, e: Any, info: TokenizerInfo) -> Context:
    t = canonical_type(e.type)
    renderer = None
    if t not in NO_TEMPLATE:
        name = e.chat_template or cfg.chat_template
        jinja = e.chat_template_jinja or cfg.chat_template_jinja
        text = template_text(name, jinja, info.tokenizer)
        if text is None and t in NEEDS_TEMPLATE:
            raise DataError(f"dataset {e.path} (type {e.type}) holds conversations, and the tokenizer has no chat "
                            "template: set chat_template (chatml, llama3, gemma, mistral, phi3) or chat_template: "
                            "jinja with chat_template_jinja")
        if text is not None:
            where = f"chat template ({name})" if name not in (None, "tokenizer_default") else "tokenizer's chat template"
            renderer = ChatRenderer(text, info.template_kwargs, info.specials, where)
    roles = dict(DEFAULT_ROLES)
    for canon, found in (e.roles or {}).items():
        for r in found:
            roles[r] = canon
    return Context(entry=e, type=t, renderer=renderer, bos=info.bos_text, eos=info.eos_text,
                   train_on_inputs=cfg.train_on_inputs, system_message=cfg.default_system_message,
                   roles_to_train=frozenset(e.roles_to_train or ["assistant"]), train_on_eos=e.train_on_eos or "turn",
                   roles=roles)


# --------------------------------------------------------------------------------------------- processing


def _process(job: Job, n_proc: int) -> tuple[list[dict[str, Any]], Counters]:
    spans = [(i, min(i + CHUNK, len(job.rows))) for i in range(0, len(job.rows), CHUNK)]
    total = Counters()
    docs: list[dict[str, Any]] = []
    if n_proc > 1 and len(spans) > 1:
        results = _parallel(job, spans, n_proc)
    else:
        results = _pipelined(job, spans)
    for d, c in results:
        docs += d
        total.add(c)
    return docs, total


def _pipelined(job: Job, spans: list[tuple[int, int]]) -> list:
    """One process: the tokenizer (Rust threads, GIL released) works on chunk i in a helper thread while
    this thread formats chunk i+1 and assembles chunk i-1."""
    from concurrent.futures import ThreadPoolExecutor

    results = []
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for a, b in spans:
            specs, where, c = _format_chunk(job, a, b)
            fut = pool.submit(tokenize_texts, job.info, spec_texts(specs))
            if pending is not None:
                results.append(_assemble_chunk(job, *pending))
            pending = (specs, where, c, fut)
        if pending is not None:
            results.append(_assemble_chunk(job, *pending))
    return results


def _parallel(job: Job, spans: list[tuple[int, int]], n_proc: int) -> list:
    import multiprocessing as mp

    global _JOB
    try:
        ctx = mp.get_context("fork")
    except ValueError:  # no fork on this platform: one process
        return _pipelined(job, spans)
    _JOB = job
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker
    pool = ctx.Pool(min(n_proc, len(spans)), initializer=_worker_init)
    try:
        out = pool.starmap(_worker, spans)
        pool.close()  # the normal end: the workers exit by themselves
        pool.join()
        return out
    finally:
        pool.terminate()  # an error or Ctrl-C: SIGTERM ends the rest (default-handled: _worker_init)
        _JOB = None
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _worker_init() -> None:
    """Default signal handling in each forked worker. Why: a fork inherits the parent's Python handlers
    (a trainer's stop-after-this-step, in a notebook that trained before), and the pool ends its workers
    with SIGTERM; a worker that only noted it would keep the pool's exit waiting forever. Ctrl-C reaches
    the whole process group: the parent handles it and ends the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(a: int, b: int) -> tuple[list[dict[str, Any]], Counters]:
    assert _JOB is not None
    specs, where, c = _format_chunk(_JOB, a, b)
    return _assemble_chunk(_JOB, specs, where, c, tokenize_texts(_JOB.info, spec_texts(specs)))


def _format_chunk(job: Job, a: int, b: int) -> tuple[list[tuple], list[tuple[str, int]], Counters]:
    c = Counters()
    specs: list[tuple] = []
    where: list[tuple[str, int]] = []
    for idx, source, rowno, row in job.rows[a:b]:
        c.rows += 1
        ctx = job.contexts[idx]
        try:
            spec = FORMATS[ctx.type](row, ctx)
        except (RowError, TemplateFailure) as err:
            rerr = err if isinstance(err, RowError) else RowError(None, str(err))
            if not job.skip_invalid:
                raise DataError(row_error_message(source, rowno, rerr)) from None
            c.skipped += 1
            if len(c.skipped_examples) < _SKIP_EXAMPLES:
                c.skipped_examples.append(row_error_message(source, rowno, rerr, hint=False))
            continue
        specs.append(spec)
        where.append((source, rowno))
    return specs, where, c


def _assemble_chunk(job: Job, specs: list[tuple], where: list[tuple[str, int]], c: Counters,
                    tokenized: Any) -> tuple[list[dict[str, Any]], Counters]:
    if hasattr(tokenized, "result"):
        tokenized = tokenized.result()
    docs: list[dict[str, Any]] = []
    for enc, (source, rowno) in zip(assemble(specs, tokenized, job.info), where):
        _finish(enc, job, c, docs, source, rowno)
    return docs, c


def _too_long(job: Job, source: str, rowno: int, n: int) -> None:
    raise DataError(f"{source}: row {rowno}: {n} tokens, longer than sequence_len {job.sequence_len} "
                    "(set excess_length_strategy: truncate or drop, or raise sequence_len)")


def _trained(labels: list[int]) -> int:
    """Tokens that are targets of the loss (the first position is never predicted)."""
    return len(labels) - 1 - labels[1:].count(IGNORE) if labels else 0


def _fit(ids: list[int], labels: list[int], job: Job, c: Counters, source: str, rowno: int):
    """Apply excess_length_strategy to one sequence; None when it is dropped."""
    L = job.sequence_len
    if len(ids) <= L:
        return ids, labels
    if job.strategy == "error":
        _too_long(job, source, rowno, len(ids))
    if job.strategy == "drop":
        c.dropped_too_long += 1
        return None
    c.truncated += 1
    return ids[:L], labels[:L]


def _finish(enc: tuple, job: Job, c: Counters, docs: list[dict[str, Any]], source: str, rowno: int) -> None:
    kind = enc[0]
    L = job.sequence_len
    if kind == "text":
        _, ids, labels, chunk = enc
        if chunk and len(ids) > L:
            pieces = [(ids[i : i + L], labels[i : i + L]) for i in range(0, len(ids), L)]
            pieces = [p for p in pieces if len(p[0]) >= 2]
            c.chunks += len(pieces) - 1
        else:
            fitted = _fit(ids, labels, job, c, source, rowno)
            if fitted is None:
                return
            pieces = [fitted]
        for ids, labels in pieces:
            n_trained = _trained(labels)
            if n_trained <= 0:
                c.dropped_no_trained_tokens += 1
                continue
            c.examples += 1
            c.tokens += len(ids)
            c.trained_tokens += n_trained
            docs.append({"input_ids": ids, "labels": labels})
    elif kind == "pair":
        (ci, cl), (ri, rl) = enc[1], enc[2]
        if len(ci) > L or len(ri) > L:
            if job.strategy == "error":
                _too_long(job, source, rowno, max(len(ci), len(ri)))
            if job.strategy == "drop":
                c.dropped_too_long += 1
                return
            c.truncated += 1
            ci, cl, ri, rl = ci[:L], cl[:L], ri[:L], rl[:L]
        tc, tr = _trained(cl), _trained(rl)
        if tc <= 0 or tr <= 0:
            c.dropped_no_trained_tokens += 1
            return
        c.examples += 1
        c.tokens += len(ci) + len(ri)
        c.trained_tokens += tc + tr
        docs.append({"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl})
    elif kind == "kto":
        _, ids, labels, label, prompt_len = enc
        fitted = _fit(ids, labels, job, c, source, rowno)
        if fitted is None:
            return
        ids, labels = fitted
        n_trained = _trained(labels)
        if n_trained <= 0 or prompt_len >= len(ids):
            c.dropped_no_trained_tokens += 1
            return
        c.examples += 1
        c.tokens += len(ids)
        c.trained_tokens += n_trained
        docs.append({"input_ids": ids, "labels": labels, "kto_label": label, "prompt_len": prompt_len})
    elif kind == "prompt":
        _, ids, columns = enc
        if len(ids) > L:
            if job.strategy == "error":
                _too_long(job, source, rowno, len(ids))
            if job.strategy == "drop":
                c.dropped_too_long += 1
                return
            c.truncated += 1
            ids = ids[-L:]  # a prompt's end (the generation prompt) matters most
        c.examples += 1
        c.tokens += len(ids)
        docs.append({"prompt_ids": ids, "columns": columns})


def _rows_out(docs: list[dict[str, Any]], kind: str, packed: bool, L: int) -> list[dict[str, Any]]:
    if kind not in ("sft", "prm"):
        return docs
    return pack_rows(docs, L) if packed else single_rows(docs)


def _stats(c: Counters, rows: list[dict[str, Any]], kind: str, packed: bool, L: int) -> dict[str, Any]:
    s: dict[str, Any] = {
        "rows_read": c.rows, "examples": c.examples, "tokens": c.tokens, "trained_tokens": c.trained_tokens,
        "dropped": c.dropped_too_long + c.dropped_no_trained_tokens, "dropped_too_long": c.dropped_too_long,
        "dropped_no_trained_tokens": c.dropped_no_trained_tokens, "truncated": c.truncated, "skipped": c.skipped,
        "rows": len(rows),
    }
    if c.chunks:
        s["extra_chunks"] = c.chunks
    if c.skipped_examples:
        s["skipped_examples"] = c.skipped_examples
    if packed:
        s["packing_efficiency"] = round(c.tokens / (len(rows) * L), 4) if rows else 0.0
    elif kind in ("sft", "prm") and rows:
        s["packing_efficiency"] = None
    return s
