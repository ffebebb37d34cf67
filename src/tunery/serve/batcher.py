"""Background batching: requests that arrive within a few milliseconds of each other are generated as one
batch by one thread that owns the model; results stream back to each request's asyncio queue."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..generate import Generator, SamplingParams, TextStream


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # ("delta", text) ... then ("done", info) or ("error", message)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: bool = False


class _RowText:
    """The text of one completion as it grows: cuts at stop strings, holds back what could start one."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.stream = TextStream(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.text += self.stream.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stops:
            cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece


class Batcher:
    """Owns the generation engine; `submit` from any thread or event loop."""

    def __init__(self, engine: Generator, tokenizer: Any, max_batch: int = 16, wait_ms: float = 5.0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.wait = wait_ms / 1000.0
        self.q: queue.Queue[Request] = queue.Queue()
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "tokens": 0}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tunery-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        self.q.put(req)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.q.get(timeout=left))
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled]
            if batch:
                self._run(batch)

    @staticmethod
    def _emit(req: Request, item: tuple) -> None:
        try:
            req.loop.call_soon_threadsafe(req.out.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone
            req.cancelled = True

    def _run(self, batch: list[Request]) -> None:
        rows = [_RowText(self.tokenizer, r.stop_strings) for r in batch]

        def on_token(i: int, token_id: int) -> bool:
            req, row = batch[i], rows[i]
            if req.cancelled:
                return True
            piece = row.push(token_id)
            if piece:
                self._emit(req, ("delta", piece))
            return row.stopped

        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        seed = next((r.seed for r in batch if r.seed is not None), None)
        try:
            results = self.engine.generate([r.prompt_ids for r in batch], [r.params for r in batch], stream=on_token,
                                           seed=seed)
        except Exception as e:  # every request of the batch gets the error, the server keeps running
            traceback.print_exc()
            for r in batch:
                self._emit(r, ("error", f"{type(e).__name__}: {e}"))
            return
        for req, row, res in zip(batch, rows, results):
            tail = row.finish()
            if tail:
                self._emit(req, ("delta", tail))
            self.stats["tokens"] += len(res.token_ids)
            reason = "stop" if (row.stopped or res.finish_reason == "stop") else "length"
            self._emit(req, ("done", {"text": row.text, "finish_reason": reason, "prompt_tokens": res.prompt_tokens,
                                      "completion_tokens": len(res.token_ids)}))
