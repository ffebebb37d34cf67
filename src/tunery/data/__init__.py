"""The data pipeline: sources, formats, tokenization with label masks, packing, cache, and batches.

Entry points: `prepare_data(cfg, tokenizer, cfg_dir=...)` for the trainer, `preprocess(cfg, ...)` for
`tunery preprocess`, `preview(cfg, tokenizer, n)` for looking at what gets trained.
"""

from .errors import DataError
from .pipeline import prepare_data, wait_for_cache_writes
from .preview import format_stats, preprocess, preview, render_row
from .types import IGNORE, PreparedData

__all__ = ["IGNORE", "DataError", "PreparedData", "format_stats", "prepare_data", "preprocess", "preview",
           "render_row", "wait_for_cache_writes"]
