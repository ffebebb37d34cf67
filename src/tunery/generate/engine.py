"""Batched KV-cache generation on Tunery's own decoder (transformers' generate for fallback models).

Prompts are left-padded into one batch; the decoder's static KVCache holds keys and values, and
its `key_mask` hides the pads. Each step feeds one token per row. On a GPU the decode step (the
whole model forward plus the LM head) is captured once in a CUDA graph and replayed, so a step
costs one graph launch plus a few sampling kernels instead of hundreds of small launches. The
engine keeps its graphs and cache between calls, so GRPO's rollouts after the first reuse them;
the weights are read in place, so LoRA updates by the optimizer are seen without recapturing.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..models.decoder import CausalLM, KVCache
from .sampling import BatchSampler, SamplingParams
from .stops import stop_token_ids

# stream(row, token_id) is called for every new token of every row; returning True ends that row.
StreamFn = Callable[[int, int], "bool | None"]


@dataclass
class Completion:
    token_ids: list[int]  # the new tokens, without the stop token
    finish_reason: str  # stop (end-of-turn token or the stream callback) | length
    prompt_tokens: int
    stop_token_id: int | None = None


@dataclass
class GenerationStats:
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cuda_graph: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _bucket(n: int) -> int:
    """Batch sizes graphs are captured for: powers of two up to 64, then multiples of 64."""
    if n <= 64:
        return 1 << (n - 1).bit_length()
    return _round_up(n, 64)


class _Graph:
    """One captured decode step for a (batch, cache length) shape, with its static buffers."""

    def __init__(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, logits: torch.Tensor,
                 graph: Any):
        self.ids, self.positions, self.cache, self.logits, self.graph = ids, positions, cache, logits, graph


class Generator:
    """Reusable generation engine for one model.

    `cuda_graphs`: "auto" (on for a CUDA model of the own decoder), True or False. `compile`: also
    torch.compile the decode step before capturing it. `autocast_dtype`: run under autocast (a model
    kept in fp32 for training, generating in bf16).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, stop_ids: list[int] | None = None,
                 pad_id: int | None = None, cuda_graphs: bool | str = "auto", compile: bool = False,
                 autocast_dtype: torch.dtype | None = None, max_graphs: int = 3, check_every: int = 8,
                 static_cache: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        cfg = getattr(model, "cfg", None)
        self.own = isinstance(model, CausalLM)
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, cfg if self.own else _hf_cfg(model))
        if pad_id is None and tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad_id) if pad_id is not None else (self.stop_ids[0] if self.stop_ids else 0)
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self.autocast_dtype = autocast_dtype
        self.max_graphs = max_graphs
        self.check_every = check_every
        self.static_cache = static_cache  # fixed-shape cache without graphs (what a graph replays; for tests)
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._step_fn: Callable | None = None
        self.last_stats = GenerationStats()

    # ------------------------------------------------------------------ public
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 stream: StreamFn | None = None, seed: int | None = None) -> list[Completion]:
        """Complete every prompt (token ids). One `SamplingParams` for all rows, or one per row."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
        plist = _per_row(params, len(prompts))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if not self.own:
                    return self._hf_generate(prompts, plist, stream, seed)
                try:
                    return self._generate_own(prompts, plist, stream, seed)
                except _NoGraph:  # pragma: no cover - GPU only; capture failed, graphs are now off
                    return self._generate_own(prompts, plist, stream, seed)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ own decoder
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.model.model.embed_tokens.weight
        dtype = self.autocast_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
        return w.device, dtype

    def _use_graphs(self, device: torch.device) -> bool:
        if device.type != "cuda" or self.cuda_graphs is False:
            return False
        if any(type(p).__name__ == "DTensor" for p in self.model.parameters()):
            return False  # FSDP-sharded weights move between steps; a graph would read stale addresses
        return True

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _generate_own(self, prompts, plist, stream, seed) -> list[Completion]:
        device, _ = self._device_dtype()
        n_real = len(prompts)
        if self._use_graphs(device) and _bucket(n_real) > n_real:
            # graphs are captured per batch size: round up with one-token dummy rows so a few graphs serve all
            extra = _bucket(n_real) - n_real
            prompts = list(prompts) + [[self.pad_id]] * extra
            plist = list(plist) + [SamplingParams(max_new_tokens=1, ignore_eos=True)] * extra
            user_stream = stream
            if user_stream is not None:
                def stream(r, tok):
                    return user_stream(r, tok) if r < n_real else True
            out = self._generate_rows(prompts, plist, stream, seed)[:n_real]
            self.last_stats.batch = n_real
            self.last_stats.new_tokens = sum(len(r.token_ids) for r in out)
            self.last_stats.prompt_tokens = sum(r.prompt_tokens for r in out)
            return out
        return self._generate_rows(prompts, plist, stream, seed)

    def _generate_rows(self, prompts, plist, stream, seed) -> list[Completion]:
        model: CausalLM = self.model  # type: ignore[assignment]
        device, dtype = self._device_dtype()
        b = len(prompts)
        lens = [len(p) for p in prompts]
        t = max(lens)
        max_new = max(p.max_new_tokens for p in plist)
        graphs = self._use_graphs(device)
        stats = GenerationStats(batch=b, prompt_tokens=sum(lens), cuda_graph=graphs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()

        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        pads = torch.tensor([t - n for n in lens], dtype=torch.long)
        ids, pads = ids.to(device), pads.to(device)
        positions = (torch.arange(t, device=device)[None, :] - pads[:, None]).clamp(min=0)

        if graphs:
            g = self._graph_for(b, _round_up(t + max_new, 128), device, dtype)
            cache = g.cache
            cache.pos.zero_()
        else:
            g = None
            cache = KVCache(model.cfg, b, t + max_new, device, dtype, static=self.static_cache)
        cache.length = 0
        slots = torch.arange(cache.max_len, device=device)
        cache.key_mask.copy_(slots[None, :] >= pads[:, None])

        gen = None
        if any(not p.greedy for p in plist):
            gen = torch.Generator(device=device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        sampler = BatchSampler(plist, model.cfg.vocab_size, device, gen)
        seen = None
        if sampler.use_penalty:
            seen = torch.zeros(b, model.cfg.vocab_size, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor(p, device=device)] = True

        with self._autocast(device):
            logits = self._prefill(model, ids, positions, cache)
        if cache.pos is not None:
            cache.pos.fill_(t)
        stats.prefill_s = time.perf_counter() - t0

        # per-row stop tokens (shared ones plus each row's own), padded with -1
        row_stops = [sorted(set(([] if p.ignore_eos else self.stop_ids) + list(p.stop_token_ids or []))) for p in plist]
        width = max(1, max(len(s) for s in row_stops))
        stop_mat = torch.full((b, width), -1, dtype=torch.long)
        for i, s in enumerate(row_stops):
            stop_mat[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        stop_mat = stop_mat.to(device)
        limit = torch.tensor([p.max_new_tokens for p in plist], device=device)
        out = torch.full((b, max_new), self.pad_id, dtype=torch.long, device=device)
        length = torch.zeros(b, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        stopped = torch.zeros(b, dtype=torch.bool, device=device)  # ended by a stop token
        host_done = [False] * b
        ended_by_stream: set[int] = set()
        cur_pos = positions[:, -1:] + 1
        if g is not None:
            g.positions.copy_(cur_pos)

        t1 = time.perf_counter()
        steps = 0
        for n in range(max_new):
            tok = sampler(logits, seen)
            active = ~done
            is_stop = (tok[:, None] == stop_mat).any(-1) & active
            out[:, n] = tok
            length = torch.where(active & ~is_stop, n + 1, length)
            stopped |= is_stop
            done = done | is_stop | (active & (n + 1 >= limit))
            steps = n + 1
            if stream is not None:
                tok_h, act_h, stop_h = tok.tolist(), active.tolist(), is_stop.tolist()
                ended = []
                for r in range(b):
                    if act_h[r] and not stop_h[r] and not host_done[r] and stream(r, tok_h[r]):
                        ended.append(r)
                if ended:
                    ended_by_stream.update(ended)
                    done[torch.tensor(ended, device=device)] = True
                host_done = done.tolist()
                if all(host_done):
                    break
            elif (n + 1) % self.check_every == 0 and bool(done.all()):
                break
            if n + 1 == max_new:
                break
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            with self._autocast(device):
                if g is not None:
                    g.ids.copy_(tok[:, None])
                    g.graph.replay()
                    g.positions.add_(1)
                    cache.pos.add_(1)
                    logits = g.logits
                else:
                    h = model(tok[:, None], cur_pos, cache=cache)
                    logits = model.logits(h[:, -1])
                    cur_pos = cur_pos + 1
                    if cache.pos is not None:
                        cache.pos.add_(1)

        out_h, len_h, stop_h = out.tolist(), length.tolist(), stopped.tolist()
        results = []
        for i in range(b):
            n_keep = len_h[i]
            if i in ended_by_stream:
                results.append(Completion(out_h[i][:n_keep], "stop", lens[i], None))
            elif stop_h[i]:
                results.append(Completion(out_h[i][:n_keep], "stop", lens[i], out_h[i][n_keep]))
            else:
                results.append(Completion(out_h[i][:n_keep], "length", lens[i], None))
        stats.decode_s = time.perf_counter() - t1
        stats.steps = steps
        stats.new_tokens = sum(len(r.token_ids) for r in results)
        self.last_stats = stats
        return results

    def _prefill(self, model: CausalLM, ids, positions, cache: KVCache) -> torch.Tensor:
        """Run the prompts through the model in row chunks (bounded activation memory); logits of the last
        position [B, V]."""
        b, t = ids.shape
        rows = max(1, 16384 // max(t, 1))
        if rows >= b:
            h = model(ids, positions, cache=cache)
            return model.logits(h[:, -1])
        parts = []
        for i in range(0, b, rows):
            sub = _row_view(cache, i, min(b, i + rows))
            h = model(ids[i : i + rows], positions[i : i + rows], cache=sub)
            parts.append(model.logits(h[:, -1]))
        cache.length += t
        return torch.cat(parts, 0)

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_key(self, b: int, max_len: int, dtype: torch.dtype) -> tuple:
        params = tuple(p.data_ptr() for p in self.model.parameters())
        flags = tuple(bool(getattr(m, "enabled", True)) for m in self.model.modules() if hasattr(m, "lora_A"))
        return (b, max_len, dtype, hash(params), flags)

    def _graph_for(self, b: int, max_len: int, device: torch.device, dtype: torch.dtype) -> _Graph:
        key = self._graph_key(b, max_len, dtype)
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
            return g
        # a longer cache for the same batch serves a shorter request too
        for k, cand in self._graphs.items():
            if k[0] == b and k[1] >= max_len and k[2:] == key[2:]:
                self._graphs.move_to_end(k)
                return cand
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        try:
            g = self._capture(b, max_len, device, dtype)
        except Exception as e:  # pragma: no cover - GPU only
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); generating without graphs",
                          stacklevel=3)
            self.cuda_graphs = False
            raise _NoGraph() from e
        self._graphs[key] = g
        return g

    def _capture(self, b: int, max_len: int, device: torch.device, dtype: torch.dtype) -> _Graph:  # pragma: no cover
        model: CausalLM = self.model  # type: ignore[assignment]
        cache = KVCache(model.cfg, b, max_len, device, dtype, static=True)
        cache.key_mask.fill_(True)
        ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        positions = torch.zeros(b, 1, dtype=torch.long, device=device)

        def step():
            cache.length = 0  # static mode does not read it; a constant keeps torch.compile from recompiling
            h = model(ids, positions, cache=cache)
            return model.logits(h[:, -1])

        fn = step
        if self.compile:
            fn = torch.compile(step, dynamic=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self._autocast(device):
            for _ in range(3):  # warm up (and compile) outside the graph
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast(device):
            logits = fn()
        cache.length = 0
        return _Graph(ids, positions, cache, logits, graph)

    # ------------------------------------------------------------------ transformers fallback
    def _hf_generate(self, prompts, plist, stream, seed) -> list[Completion]:
        hf = self.model.hf if hasattr(self.model, "hf") else self.model
        device = next(hf.parameters()).device
        results: list[Completion | None] = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(plist):
            key = (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty,
                   tuple(p.stop_token_ids or ()), p.ignore_eos)
            groups.setdefault(key, []).append(i)
        if seed is not None:
            torch.manual_seed(seed)
        for _key, rows in groups.items():
            p = plist[rows[0]]
            stops = sorted(set(([] if p.ignore_eos else self.stop_ids) + list(p.stop_token_ids or [])))
            t = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), t), dtype=torch.long)
            for j, i in enumerate(rows):
                n = len(prompts[i])
                ids[j, t - n :] = torch.tensor(prompts[i])
                mask[j, t - n :] = 1
            kw: dict[str, Any] = dict(max_new_tokens=p.max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=stops or None, repetition_penalty=p.repetition_penalty)
            if p.greedy:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
            if p.ignore_eos:
                kw["min_new_tokens"] = p.max_new_tokens
            streamer = _HFStreamer(rows, stops, stream) if stream is not None else None
            out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer, **kw)
            new = out[:, t:].tolist()
            for j, i in enumerate(rows):
                toks = new[j]
                cut = next((k for k, x in enumerate(toks) if x in stops), None)
                if streamer is not None and streamer.ended_at[j] is not None:
                    end = streamer.ended_at[j]
                    results[i] = Completion(toks[:end], "stop", len(prompts[i]), None)
                elif cut is not None:
                    results[i] = Completion(toks[:cut], "stop", len(prompts[i]), toks[cut])
                else:
                    results[i] = Completion(toks[: p.max_new_tokens], "length", len(prompts[i]), None)
        return [r for r in results if r is not None]


class _NoGraph(Exception):
    pass


class _HFStreamer:
    """transformers streamer API (put/end) for a batch: forwards each row's tokens to `stream(row, id)`."""

    def __init__(self, rows: list[int], stops: list[int], stream: StreamFn):
        self.rows, self.stops, self.stream = rows, set(stops), stream
        self.first = True
        self.done = [False] * len(rows)
        self.count = [0] * len(rows)
        self.ended_at: list[int | None] = [None] * len(rows)

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        toks = value.reshape(len(self.rows), -1)[:, -1].tolist()
        for j, tok in enumerate(toks):
            if self.done[j]:
                continue
            if tok in self.stops:
                self.done[j] = True
                continue
            self.count[j] += 1
            if self.stream(self.rows[j], tok):
                self.done[j] = True
                self.ended_at[j] = self.count[j]

    def end(self) -> None:
        pass


def _hf_cfg(model: nn.Module) -> Any:
    hf = getattr(model, "hf", model)
    gen = getattr(hf, "generation_config", None)
    if gen is not None and getattr(gen, "eos_token_id", None) is not None:
        return gen
    return getattr(hf, "config", None)


def _per_row(params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
    return list(params)


def _row_view(cache: KVCache, i: int, j: int) -> KVCache:
    """A KVCache over rows i:j of `cache` that writes through to it."""
    sub = object.__new__(KVCache)
    sub.k = [x[i:j] for x in cache.k]
    sub.v = [x[i:j] for x in cache.v]
    sub.key_mask = cache.key_mask[i:j]
    sub.length = cache.length
    sub.max_len = cache.max_len
    sub.pos = cache.pos
    sub.masks = {}
    return sub


_ENGINES: weakref.WeakKeyDictionary[nn.Module, Generator] = weakref.WeakKeyDictionary()


def engine_for(model: nn.Module, tokenizer: Any = None, **kwargs: Any) -> Generator:
    """The model's cached Generator (graphs and buffers kept between calls); a new one if kwargs differ."""
    eng = _ENGINES.get(model)
    if eng is None or kwargs or (tokenizer is not None and eng.tokenizer is not tokenizer):
        eng = Generator(model, tokenizer, **kwargs)
        _ENGINES[model] = eng
    return eng


def generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
             tokenizer: Any = None, stream: StreamFn | None = None, seed: int | None = None,
             **engine_kwargs: Any) -> list[Completion]:
    """Complete token-id prompts with `model` (own decoder or transformers fallback), batched.

    Stops at the tokenizer's eos and end-of-turn tokens. `stream(row, token_id)` sees every new token.
    """
    return engine_for(model, tokenizer, **engine_kwargs).generate(prompts, params, stream, seed)
