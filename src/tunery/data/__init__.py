"""The data pipeline: sources, formats, tokenization with label masks, packing, cache, and batches.

    prepare_data(cfg, tokenizer, *, for_eval_only=False, cfg_dir=None, use_cache=True) -> PreparedData
        what the trainer calls; raises DataError (a ValueError naming file, row and field) on bad data
    preprocess(cfg, debug=0, dump=None, stream=sys.stdout, *, cfg_dir=None, tokenizer) -> stats dict
        `tunery preprocess CONFIG [--debug N] [--dump FILE]`
    preview(cfg, tokenizer, n=5, *, cfg_dir=None, color=False) -> list of examples with a "rendered" text
    wait_for_cache_writes()  the cache is written by a background thread; this waits for it

Modules: sources (files, folders, globs, hub ids), formats (row -> text and trained spans), templates
(chat templates; masks found by rendering), tokenize (batched fast tokenization, spans -> labels),
packing (best-fit decreasing), cache (content-keyed, atomic), pipeline (prepare_data), preview,
collate (padding-free batches), types (PreparedData).
"""

from .errors import DataError
from .pipeline import prepare_data, wait_for_cache_writes
from .preview import format_stats, preprocess, preview, render_row
from .types import IGNORE, PreparedData

__all__ = ["IGNORE", "DataError", "PreparedData", "format_stats", "prepare_data", "preprocess", "preview",
           "render_row", "wait_for_cache_writes"]
