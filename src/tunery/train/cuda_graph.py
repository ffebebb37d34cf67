"""A whole optimizer step (every micro-batch's forward and backward, then the optimizer) captured once as
a CUDA graph, then replayed.

Why: a QLoRA step of an 8B model issues ~4,100 kernel launches from Python, and on hosts with a slower
CPU the GPU waits for that thread: the step took 338-363 ms where its GPU work needs ~296
(benchmarks/RESULTS.md, thirteenth and fourteenth sessions). A replay is one launch.

What a captured step may do, and what this module checks or the caller promises:
- the inputs are CUDA tensors of fixed shapes and dtypes (checked: a step with other shapes runs
  eagerly); host-side values the step reads (a max sequence length, a count made on the host) are
  the same at every replay: the caller passes them as `key`, and a step with another key runs eagerly.
  `pad_flat_batch` gives the trainer's padding-free batches fixed shapes;
- no host sync and no host-side decision from device data inside the step (a capture that meets one
  fails, and the run goes on eagerly with a warning); `kernels.static_rows` is on while capturing, so
  the fused cross-entropy keeps every row instead of picking the labelled ones on the host;
- the optimizer is capturable (Adam/AdamW are switched to `capturable=True`, the learning rate becomes
  a device tensor that the scheduler fills in place);
- offloaded activations (train/activations.py, strategy "activations") are captured with their copies
  to fixed pinned buffers, which this object keeps alive; what such checkpointing still decides on the
  host (save_mlp "auto" timing forwards) must be settled first: capture waits until it is.
Not captured: the batch's trip to the GPU and anything looked up on the host (a CPU-held embedding):
the caller does that and hands the results in as inputs.

The fused LoRA kernels' cached bf16 adapter copies refresh at the first forward after each optimizer
step (kernels.cast_params): the capture records that refresh, so every replay refreshes them too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..kernels import host_copy, params_changed, static_rows, with_host_copy

Inputs = dict[str, torch.Tensor]


class StepGraph:
    """`step(key, micro)` runs, for each dict of inputs in `micro`, `loss_fn(**inputs).backward()`, then
    `after_backward()` (gradient clipping: its result, e.g. the norm, is returned) and `optimizer.step()`.
    Eagerly for the first `warmup` steps (allocations, autotuning, the optimizer's state), then captured
    once and replayed for every later step with the same key and input shapes. Returns (the
    micro-batches' losses, after_backward's result), new tensors.

    `checkpoint`: the model's checkpoint function (an OffloadCheckpoint or None), asked whether it can be
    captured yet (`graph_blocker`), for its copy streams and its pinned buffers.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 checkpoint: Any = None, after_backward: Callable[[], Any] | None = None, warmup: int = 2):
        self.loss_fn, self.optimizer, self.checkpoint = loss_fn, optimizer, checkpoint
        self.after_backward = after_backward or (lambda: None)
        self.warmup = max(1, warmup)  # the optimizer's state and the kernels' caches exist only after a step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Hashable = None
        self.static: list[Inputs] = []
        self.out: tuple[list[torch.Tensor], Any] = ([], None)
        self.eager_steps = self.replays = self.captures = 0
        self.why_eager: str | None = "warming up"  # why the last step ran eagerly (None: it replayed)
        self.failed: str | None = None  # why a capture failed (then every step runs eagerly)
        self._keep: list[Any] = []  # what the graph reads or writes by address: gradients, pinned buffers

    # ---------------------------------------------------------------- per step
    def step(self, key: Hashable, micro: list[Inputs]) -> tuple[list[torch.Tensor], Any]:
        if self.graph is not None:
            why = self._mismatch(key, micro)
            if why is None:
                return self._replay(micro)
            self.why_eager = why
            return self._eager(micro)
        why = f"capture failed: {self.failed}" if self.failed else self._blocker(micro)
        self.why_eager = why
        if why is not None:
            return self._eager(micro)
        return self._capture(key, micro)

    def reset(self) -> None:
        """Drop the graph (and its memory pool): the next step runs eagerly and a later one captures again."""
        self.graph, self.static, self.out, self._keep = None, [], ([], None), []
        self.optimizer.zero_grad(set_to_none=True)

    def _run(self, micro: list[Inputs]) -> tuple[list[torch.Tensor], Any]:
        losses = []
        for inputs in micro:
            loss = self.loss_fn(**inputs)
            loss.backward()
            losses.append(loss.detach())
        aux = self.after_backward()
        self.optimizer.step()
        return losses, aux

    def _eager(self, micro: list[Inputs]) -> tuple[list[torch.Tensor], Any]:
        if self.graph is not None:  # the graph owns the gradient tensors: an eager step makes its own
            self.optimizer.zero_grad(set_to_none=True)
        out = self._run(micro)
        self.optimizer.zero_grad(set_to_none=True)
        self.eager_steps += 1
        return out

    def _replay(self, micro: list[Inputs]) -> tuple[list[torch.Tensor], Any]:
        for static, inputs in zip(self.static, micro):
            for k, v in inputs.items():
                static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        params_changed()  # host-side readers of the adapters' cached casts (eval, an eager step) refresh them
        return _fresh(self.out)

    # ---------------------------------------------------------------- capture
    def _blocker(self, micro: list[Inputs]) -> str | None:
        if self.eager_steps < self.warmup:
            return "warming up"
        if not micro or not all(isinstance(v, torch.Tensor) and v.is_cuda for m in micro for v in m.values()):
            return "the inputs are not all CUDA tensors"
        block = getattr(self.checkpoint, "graph_blocker", None)
        return block() if block is not None else None

    def _mismatch(self, key: Hashable, micro: list[Inputs]) -> str | None:
        if key != self.key:
            return f"key {key!r} is not the captured step's {self.key!r}"
        if len(micro) != len(self.static):
            return f"{len(micro)} micro-batches, the captured step had {len(self.static)}"
        for static, inputs in zip(self.static, micro):
            if inputs.keys() != static.keys():
                return f"inputs {sorted(inputs)} are not the captured step's {sorted(static)}"
            for k, v in inputs.items():
                s = static[k]
                if v.shape != s.shape or v.dtype != s.dtype or v.device != s.device:
                    return (f"input {k!r} is {tuple(v.shape)} {v.dtype}, the captured step's "
                            f"{tuple(s.shape)} {s.dtype}")
        return None

    def _capture(self, key: Hashable, micro: list[Inputs]) -> tuple[list[torch.Tensor], Any]:
        opt = self.optimizer
        device = next(iter(micro[0].values())).device
        make_capturable(opt, device)
        opt.zero_grad(set_to_none=True)  # the captured backward makes the gradients: replays overwrite them
        self.static = [{k: _static_copy(v) for k, v in inputs.items()} for inputs in micro]
        streams = self.checkpoint.side_streams() if hasattr(self.checkpoint, "side_streams") else []
        graph = torch.cuda.CUDAGraph()
        params_changed()  # the capture's first forward refreshes the cached casts: so does every replay
        try:
            with torch.cuda.graph(graph), static_rows():
                main = torch.cuda.current_stream()
                for s in streams:  # the copy streams join the capture here and rejoin it at the end
                    s.wait_stream(main)
                out = self._run(self.static)
                if hasattr(self.checkpoint, "release_held"):
                    self.checkpoint.release_held(None, device)
                for s in streams:
                    main.wait_stream(s)
        except Exception as e:  # a host sync or a host-side read inside the step: train on, eagerly
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            warnings.warn(f"cuda_graph: the training step could not be captured, it runs eagerly ({self.failed})",
                          stacklevel=3)
            if hasattr(self.checkpoint, "held"):
                self.checkpoint.held.clear()
            self.static = []
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            self.why_eager = f"capture failed: {self.failed}"
            return self._eager(micro)
        self.graph, self.key, self.out = graph, key, out
        self.captures += 1
        self._keep = [p.grad for g in opt.param_groups for p in g["params"]]
        pool = getattr(self.checkpoint, "pool", None)
        if pool is not None:  # the graph copies to and from these host buffers by address
            self._keep += [*pool.registered, *pool.free]
        graph.replay()  # capturing ran nothing: this step's work
        self.replays += 1
        params_changed()
        return _fresh(out)


def make_capturable(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam-style optimizers run captured: `capturable=True`, their step counts on the device, and the
    learning rate a device tensor (an LR scheduler then fills it in place before each replay)."""
    for group in opt.param_groups:
        if "capturable" in group:
            group["capturable"] = True
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:  # a CPU tensor would be read once, at capture
            group["lr"] = torch.tensor(float(lr), device=device)
    for state in opt.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and not step.is_cuda:
            state["step"] = step.to(device)


def _fresh(out: tuple[list[torch.Tensor], Any]) -> tuple[list[torch.Tensor], Any]:
    losses, aux = out
    return [t.clone() for t in losses], (aux.clone() if isinstance(aux, torch.Tensor) else aux)


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """A clone that keeps t's host copy (kernels.with_host_copy): host-side readers inside the step see
    the values they saw when capturing, the values the key vouches for."""
    out = t.detach().clone()
    host = host_copy(t)
    if host is not None:
        with_host_copy(out, host.clone())
    return out


# ---------------------------------------------------------------------------- the trainer's steps
class GraphedSteps:
    """The trainer's side of `cuda_graph: true` (SFT, one GPU): each micro-batch padded to fixed shapes
    (`tokens` tokens, a power-of-two count of documents, grown and captured again when a batch has
    more), the loss normaliser handed in as a device tensor, a CPU-held embedding looked up outside the
    graph, clipping inside it. `step(batches, normalizer)` -> (the summed loss, the gradient norm)."""

    def __init__(self, model, method, optimizer, params: list[torch.Tensor], *, to_device: Callable,
                 autocast: Callable, tokens: int, max_seqlen: int, max_grad_norm: float | None, pad_id: int = 0):
        from ..quant.embedding import CPUEmbedding
        from .distributed import clip_grad_norm

        body = getattr(model, "model", None)
        self.model, self.method, self.to_device, self.autocast = model, method, to_device, autocast
        self.tokens, self.max_seqlen, self.pad_id = tokens, max_seqlen, pad_id
        self.embed_outside = isinstance(getattr(body, "embed_tokens", None), CPUEmbedding)
        self.docs = 0
        self.graph = StepGraph(self._loss, optimizer, checkpoint=getattr(body, "checkpoint_fn", None),
                               after_backward=lambda: clip_grad_norm(params, max_grad_norm, as_tensor=True))

    def _loss(self, normalizer: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        batch: dict[str, Any] = dict(inputs, max_seqlen=self.max_seqlen)
        with self.autocast():
            loss, _ = self.method.loss(self.model, batch, normalizer)
        return loss

    def step(self, batches: list[dict[str, Any]], normalizer: int) -> tuple[torch.Tensor, torch.Tensor]:
        need = 0
        for b in batches:
            n = b["input_ids"].shape[-1]
            if n > self.tokens or int(b["max_seqlen"]) > self.max_seqlen:
                raise ValueError(f"cuda_graph: a micro-batch of {n} tokens (longest document {int(b['max_seqlen'])}) "
                                 f"does not fit micro_batch_size x sequence_len = {self.tokens} tokens "
                                 f"(documents of at most {self.max_seqlen})")
            need = max(need, b["cu_seqlens"].numel() - 1 + math.ceil((self.tokens - n) / self.max_seqlen))
        if need > self.docs:  # more documents than the captured shapes hold: capture again, twice as many
            if self.graph.graph is not None:
                self.graph.reset()
            self.docs = max(4, 1 << (need - 1).bit_length())
        norm = torch.tensor(float(max(normalizer, 1)))
        micro = []
        for b in batches:
            padded = pad_flat_batch(b, self.tokens, self.docs, self.max_seqlen, self.pad_id)
            d = self.to_device({k: padded[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens")}
                               | {"normalizer": norm})
            if self.embed_outside:
                d["inputs_embeds"] = self.model.embed(d["input_ids"])
            micro.append(d)
        losses, grad_norm = self.graph.step((self.tokens, self.docs, self.max_seqlen), micro)
        return torch.stack(losses).sum(), grad_norm


# ---------------------------------------------------------------------------- fixed-shape batches
def pad_flat_batch(batch: dict[str, Any], tokens: int, docs: int, max_seqlen: int, pad_id: int = 0) -> dict | None:
    """A padding-free batch (data/collate.py: one [1, N] row of documents) padded to `tokens` tokens and
    `docs` documents, the shapes a captured step needs: the padding is documents of at most `max_seqlen`
    tokens with label -100 (no loss, attention inside each), and cu_seqlens ends in zero-length documents.
    max_seqlen becomes `max_seqlen` (every real document is at most that long). None when the batch has
    more tokens or documents than that (it runs eagerly)."""
    ids, cu = batch["input_ids"], batch["cu_seqlens"]
    n, real = ids.shape[-1], cu.numel() - 1
    pad = tokens - n
    pad_docs = math.ceil(pad / max_seqlen) if pad > 0 else 0
    if pad < 0 or real + pad_docs > docs or int(batch["max_seqlen"]) > max_seqlen:
        return None
    sizes = [min(max_seqlen, pad - i * max_seqlen) for i in range(pad_docs)]
    pos = torch.cat([torch.arange(s) for s in sizes]) if sizes else torch.zeros(0, dtype=torch.long)
    ends = [n + sum(sizes[: i + 1]) for i in range(pad_docs)]
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((1, pad), pad_id)], -1)
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, pad), -100)], -1)
    out["position_ids"] = torch.cat([batch["position_ids"], pos[None].to(batch["position_ids"].dtype)], -1)
    out["cu_seqlens"] = torch.cat([cu, cu.new_tensor(ends), cu.new_full((docs - real - pad_docs,), tokens)])
    out["max_seqlen"] = max_seqlen
    return out


__all__ = ["GraphedSteps", "StepGraph", "make_capturable", "pad_flat_batch"]
