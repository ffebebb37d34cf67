"""Pipeline: sources, packing, cache invalidation, bad data, splits, preprocess output."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from tunery.config import load_config
from tunery.data import IGNORE, DataError, prepare_data, preprocess, preview
from tunery.data.collate import collate_sft
from tunery.data.packing import pack_bins


@pytest.fixture(scope="module")
def smol(smol_path):
    return AutoTokenizer.from_pretrained(str(smol_path))


ROWS = [{"instruction": f"Question {i}: what is {i} + {i}?" + " Explain." * (i % 7),
         "output": f"The answer is {2 * i}." + " Indeed." * (i % 5)} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config(tmp_path, datasets, **extra):
    return load_config({"datasets": datasets, "dataset_prepared_path": str(tmp_path / "prep"), **extra})


# ------------------------------------------------------------------------------------------- packing


def test_packing_rows_and_position_ids(tmp_path, smol):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = [{"path": "d.jsonl", "type": "alpaca"}]
    single = prepare_data(config(tmp_path, ds, sequence_len=256, shuffle_merged_datasets=False), smol,
                          cfg_dir=tmp_path)
    packed = prepare_data(config(tmp_path, ds, sequence_len=256, sample_packing=True), smol, cfg_dir=tmp_path)
    docs = [(tuple(r["input_ids"]), tuple(r["labels"])) for r in single.train]
    assert len(docs) == 40 and all(r["position_ids"] == list(range(len(r["input_ids"]))) for r in single.train)
    assert len(packed.train) < 40
    found = []
    for r in packed.train:
        assert len(r["input_ids"]) <= 256 and len(r["labels"]) == len(r["position_ids"]) == len(r["input_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))  # restarts at 0 for each document
            found.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a:b])))
    assert Counter(found) == Counter(docs)  # every document exactly once, intact
    s = packed.stats
    assert s["examples"] == 40 and s["rows"] == len(packed.train)
    assert s["packing_efficiency"] == pytest.approx(s["tokens"] / (256 * len(packed.train)), abs=1e-4)
    batch = collate_sft(packed.train[:2])
    n_docs = sum(r["position_ids"].count(0) for r in packed.train[:2])
    assert batch["cu_seqlens"].numel() == n_docs + 1


def test_best_fit_decreasing_packs_at_least_as_well_as_ffd():
    import random

    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 200))]
        bins = pack_bins(lengths, 100)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
        ffd: list[int] = []
        for n in sorted(lengths, reverse=True):
            for j, room in enumerate(ffd):
                if room >= n:
                    ffd[j] -= n
                    break
            else:
                ffd.append(100 - n)
        assert len(bins) <= len(ffd)


# ------------------------------------------------------------------------------------------- cache


def test_cache_reuse_and_one_byte_change(tmp_path, smol):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = config(tmp_path, [{"path": "d.jsonl", "type": "alpaca"}], sample_packing=True, sequence_len=512)
    first = prepare_data(cfg, smol, cfg_dir=tmp_path)
    again = prepare_data(cfg, smol, cfg_dir=tmp_path)
    assert first.stats["cache"] == "built" and again.stats["cache"] == "hit"
    assert again.fingerprint == first.fingerprint and again.train == first.train and again.kind == "sft"
    path = str((tmp_path / "d.jsonl").resolve())
    assert list(first.files) == [path] and len(first.files[path]) == 64
    # The same content under another name is the same data.
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "d.jsonl").read_bytes())
    renamed = prepare_data(config(tmp_path, [{"path": "copy.jsonl", "type": "alpaca"}], sample_packing=True,
                                  sequence_len=512), smol, cfg_dir=tmp_path)
    assert renamed.stats["cache"] == "hit" and renamed.fingerprint == first.fingerprint
    # One byte changed -> rebuilt, and the change shows.
    raw = bytearray((tmp_path / "d.jsonl").read_bytes())
    at = raw.index(b"answer is 0")
    raw[at + len("answer is ")] = ord("7")
    (tmp_path / "d.jsonl").write_bytes(bytes(raw))
    changed = prepare_data(cfg, smol, cfg_dir=tmp_path)
    assert changed.stats["cache"] == "built" and changed.fingerprint != first.fingerprint
    assert changed.files[path] != first.files[path]
    assert any("answer is 7." in smol.decode(r["input_ids"]) for r in changed.train)
    # A setting that changes rows changes the key; the tokenizer is part of it too.
    other = prepare_data(config(tmp_path, [{"path": "d.jsonl", "type": "alpaca"}], sample_packing=True,
                                sequence_len=256), smol, cfg_dir=tmp_path)
    assert other.fingerprint != changed.fingerprint
    tok2 = AutoTokenizer.from_pretrained(smol.name_or_path)
    tok2.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    assert prepare_data(cfg, tok2, cfg_dir=tmp_path).fingerprint != changed.fingerprint
    # No half-written cache folders are left behind (once the background writes are done).
    from tunery.data import wait_for_cache_writes

    wait_for_cache_writes()
    assert not [p for p in (tmp_path / "prep").iterdir() if p.name.startswith(".")]


def test_cache_roundtrip_for_other_kinds(tmp_path, smol):
    rows = [{"prompt": "What is 1+1?", "answer": "2", "meta": {"k": [1, 2]}}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = config(tmp_path, [{"path": "p.jsonl", "type": "prompts"}])
    a = prepare_data(cfg, smol, cfg_dir=tmp_path)
    b = prepare_data(cfg, smol, cfg_dir=tmp_path)
    assert b.stats["cache"] == "hit" and a.train == b.train and b.train[0]["columns"]["meta"] == {"k": [1, 2]}


# ------------------------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("rows, entry, pattern", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], {"type": "alpaca"},
     r"bad\.jsonl: row 2: field 'output': missing"),
    ([{"instruction": "a", "output": 5}], {"type": "alpaca"}, r"row 1: field 'output': expected a string, got int"),
    ([{"messages": []}], {"type": "chat_template"}, r"row 1: field 'messages': empty conversation"),
    ([{"messages": [{"role": "user", "content": 3}]}], {"type": "chat_template"},
     r"row 1: field 'messages\[0\]\.content': expected a string"),
    ([{"prompt": "p", "completion": "c", "label": "yes"}], {"type": "kto"}, r"row 1: field 'label': expected a boolean"),
    ([{"segments": [{"text": "a", "label": "true"}]}], {"type": "input_output"},
     r"row 1: field 'segments\[0\]\.label': expected a boolean"),
    ([{"prompt": "p", "completions": ["a", "b"], "labels": [True]}], {"type": "prm"}, r"row 1: field 'labels'"),
])
def test_malformed_rows_name_file_row_field(tmp_path, smol, rows, entry, pattern):
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=pattern):
        prepare_data(config(tmp_path, [{"path": "bad.jsonl", **entry}]), smol, cfg_dir=tmp_path)


def test_skip_invalid_rows_counts(tmp_path, smol):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": 1, "output": "x"},
            {"instruction": "c", "output": "d"}]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    d = prepare_data(config(tmp_path, [{"path": "bad.jsonl", "type": "alpaca"}], skip_invalid_rows=True), smol,
                     cfg_dir=tmp_path)
    assert d.stats["skipped"] == 2 and d.stats["examples"] == 2 and len(d.train) == 2
    assert any("row 2" in m and "output" in m for m in d.stats["skipped_examples"])


def test_not_json(tmp_path, smol):
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"x\.jsonl: row 2: not valid JSON"):
        prepare_data(config(tmp_path, [{"path": "x.jsonl"}]), smol, cfg_dir=tmp_path)


def test_excess_length_strategies(tmp_path, smol):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "long " * 200, "output": "answer " * 50}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    ds = [{"path": "d.jsonl", "type": "alpaca"}]
    dropped = prepare_data(config(tmp_path, ds, sequence_len=128), smol, cfg_dir=tmp_path)
    assert dropped.stats["dropped_too_long"] == 1 and len(dropped.train) == 1
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: \d+ tokens, longer than sequence_len 128"):
        prepare_data(config(tmp_path, ds, sequence_len=128, excess_length_strategy="error"), smol, cfg_dir=tmp_path)
    # Truncating a row whose answer starts past the limit leaves nothing to train: dropped, and said so.
    cut = prepare_data(config(tmp_path, ds, sequence_len=128, excess_length_strategy="truncate"), smol,
                       cfg_dir=tmp_path)
    assert cut.stats["truncated"] == 1 and cut.stats["dropped_no_trained_tokens"] == 1 and len(cut.train) == 1
    cut = prepare_data(config(tmp_path, ds, sequence_len=250, excess_length_strategy="truncate"), smol,
                       cfg_dir=tmp_path)
    assert cut.stats["truncated"] == 1 and max(len(r["input_ids"]) for r in cut.train) == 250


# ------------------------------------------------------------------------------------------- splits, sources


def test_val_split_is_deterministic_and_disjoint(tmp_path, smol):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = [{"path": "d.jsonl", "type": "alpaca"}]
    a = prepare_data(config(tmp_path, ds, val_set_size=0.25, seed=1), smol, cfg_dir=tmp_path)
    b = prepare_data(config(tmp_path, ds, val_set_size=0.25, seed=1), smol, cfg_dir=tmp_path, use_cache=False)
    c = prepare_data(config(tmp_path, ds, val_set_size=10, seed=2), smol, cfg_dir=tmp_path)
    assert len(a.eval) == 10 and len(a.train) == 30 and a.eval == b.eval
    assert {tuple(r["input_ids"]) for r in a.eval}.isdisjoint({tuple(r["input_ids"]) for r in a.train})
    assert len(c.eval) == 10 and c.eval != a.eval
    assert a.stats["eval"]["examples"] == 10


def test_test_datasets_and_eval_only(tmp_path, smol):
    write_jsonl(tmp_path / "d.jsonl", ROWS[:30])
    write_jsonl(tmp_path / "t.jsonl", ROWS[30:])
    cfg = config(tmp_path, [{"path": "d.jsonl", "type": "alpaca"}],
                 test_datasets=[{"path": "t.jsonl", "type": "alpaca"}], val_set_size=0.5)
    d = prepare_data(cfg, smol, cfg_dir=tmp_path)
    assert len(d.train) == 30 and len(d.eval) == 10
    e = prepare_data(cfg, smol, cfg_dir=tmp_path, for_eval_only=True)
    assert e.train == [] and len(e.eval) == 10


def test_sources_formats_folders_globs(tmp_path, smol):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = ROWS[:4]
    folder = tmp_path / "mix"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(rows[:1]))
    table = pa.Table.from_pylist(rows[1:2])
    pq.write_table(table, folder / "b.parquet")
    buf = io.BytesIO()
    pcsv.write_csv(pa.Table.from_pylist(rows[2:3]), buf)
    (folder / "c.csv").write_bytes(buf.getvalue())
    with pa.OSFile(str(folder / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(pa.Table.from_pylist(rows[3:4]))
    (folder / "e.jsonl.gz").write_bytes(gzip.compress((json.dumps(rows[0]) + "\n").encode()))
    (folder / "README.md").write_text("not data")
    d = prepare_data(config(tmp_path, [{"path": "mix", "type": "alpaca"}], shuffle_merged_datasets=False), smol,
                     cfg_dir=tmp_path)
    assert d.stats["rows_read"] == 5 and len(d.files) == 5
    texts = [smol.decode(r["input_ids"]) for r in d.train]
    for r, t in zip(rows + rows[:1], texts):
        assert r["instruction"] in t and r["output"] in t
    g = prepare_data(config(tmp_path, [{"path": "mix/*.json*", "type": "alpaca"}]), smol, cfg_dir=tmp_path)
    assert g.stats["rows_read"] == 2
    two = prepare_data(config(tmp_path, [{"path": "mix/a.json", "type": "alpaca"},
                                         {"path": "mix/b.parquet", "type": "alpaca"}]), smol, cfg_dir=tmp_path)
    assert two.stats["examples"] == 2


def test_missing_path_and_offline_hub_id(tmp_path, smol, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        prepare_data(config(tmp_path, [{"path": "nope.jsonl"}]), smol, cfg_dir=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'someone/some-dataset'.*hub.*HF_HUB_OFFLINE"):
        prepare_data(config(tmp_path, [{"path": "someone/some-dataset"}]), smol, cfg_dir=tmp_path)


def test_workers_give_the_same_rows(tmp_path, smol, monkeypatch):
    import tunery.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "CHUNK", 8)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = [{"path": "d.jsonl", "type": "alpaca"}]
    one = prepare_data(config(tmp_path, ds, sample_packing=True), smol, cfg_dir=tmp_path, use_cache=False)
    two = prepare_data(config(tmp_path, ds, sample_packing=True, dataset_num_proc=2), smol, cfg_dir=tmp_path,
                       use_cache=False)
    assert one.train == two.train


def _signal_dispositions(a: int, b: int) -> tuple[bool, bool]:
    """Stands in for the tokenizing worker (the pool sends it by name): how the worker handles signals."""
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_workers_die_of_sigterm_even_under_a_parent_handler(monkeypatch):
    """A forked worker must not inherit the parent's Python SIGTERM handler (a trainer's stop-after-this-
    step, in a notebook that trained before): the pool ends its workers with SIGTERM, and a worker that
    only took note of it kept the pool's exit waiting forever (a CI run hung there)."""
    import signal

    import tunery.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_worker", _signal_dispositions)
    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        got = pipeline._parallel(object(), [(i, i + 1) for i in range(4)], 2)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [(True, True)] * 4


# ------------------------------------------------------------------------------------------- preprocess


def test_preprocess_debug_and_dump(tmp_path, smol):
    write_jsonl(tmp_path / "d.jsonl", ROWS[:5])
    cfg = config(tmp_path, [{"path": "d.jsonl", "type": "alpaca"}], sample_packing=True, sequence_len=512)
    out = io.StringIO()
    stats = preprocess(cfg, debug=2, dump=tmp_path / "rows.jsonl", stream=out, cfg_dir=tmp_path, tokenizer=smol)
    text = out.getvalue()
    assert "5 examples" in text and "packing efficiency" in text and "trained tokens" in text
    assert "[[The answer is 0.<|im_end|>]]" in text or "[[The answer is" in text
    assert "\x1b[" not in text  # not a terminal: brackets, no colour
    assert stats["examples"] == 5
    dumped = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert dumped and set(dumped[0]) == {"input_ids", "labels", "position_ids"}
    assert sum(r["position_ids"].count(0) for r in dumped) == 5
    ex = preview(cfg, smol, 3, cfg_dir=tmp_path)
    assert len(ex) == 3 and all(ex_["position_ids"][0] == 0 and "[[" in ex_["rendered"] for ex_ in ex)
    trained = [i for i, lab in zip(ex[0]["input_ids"], ex[0]["labels"]) if lab != IGNORE]
    assert smol.decode(trained).endswith("<|im_end|>")


def test_damaged_cache_is_rebuilt_and_later_row_edits_do_not_leak(tmp_path, smol):
    from tunery.data import wait_for_cache_writes

    write_jsonl(tmp_path / "d.jsonl", ROWS[:6])
    cfg = config(tmp_path, [{"path": "d.jsonl", "type": "alpaca"}])
    first = prepare_data(cfg, smol, cfg_dir=tmp_path)
    first.train[0]["ref_chosen_logps"] = -1.0  # a method adding keys while the cache is being written
    wait_for_cache_writes()
    hit = prepare_data(cfg, smol, cfg_dir=tmp_path)
    assert hit.stats["cache"] == "hit" and "ref_chosen_logps" not in hit.train[0]
    folder = tmp_path / "prep" / first.fingerprint
    (folder / "train.input_ids.bin").write_bytes(b"\x00\x01")
    again = prepare_data(cfg, smol, cfg_dir=tmp_path)
    assert again.stats["cache"] == "built" and again.train == hit.train
    assert prepare_data(cfg, smol, cfg_dir=tmp_path).stats["cache"] == "hit"


def test_colour_on_a_terminal(smol):
    from tunery.data.preview import render_tokens

    ids = smol("Hello world", add_special_tokens=False)["input_ids"]
    labels = [IGNORE] + ids[1:]
    coloured = render_tokens(smol, ids, labels, color=True)
    assert "\x1b[32m" in coloured and "\x1b[90m" in coloured and "[[" not in coloured
    assert render_tokens(smol, ids, labels, color=False) == "Hello[[ world]]"


def test_csv_cells_stay_text_and_booleans_parse(tmp_path, smol):
    (tmp_path / "k.csv").write_text('prompt,completion,label\n"Pick a number","007",true\n"Again","42",false\n')
    d = prepare_data(config(tmp_path, [{"path": "k.csv", "type": "kto"}], shuffle_merged_datasets=False), smol,
                     cfg_dir=tmp_path)
    assert [r["kto_label"] for r in d.train] == [True, False]
    assert "007" in smol.decode(d.train[0]["input_ids"])


def test_another_trainers_strategy_type_names_the_entry_and_what_to_write(tmp_path, smol):
    write_jsonl(tmp_path / "pairs.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    cfg = config(tmp_path, [{"path": "pairs.jsonl", "type": "chatml.intel"}], rl="dpo")
    with pytest.raises(DataError, match=r"^datasets\[0\] \(pairs.jsonl\): dataset type 'chatml.intel' is unknown.*"
                                        r"type: preference with field_prompt .* chat_template: chatml$"):
        prepare_data(cfg, smol, cfg_dir=tmp_path)
