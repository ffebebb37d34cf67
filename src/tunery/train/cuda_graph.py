"""A whole training step (forward, backward, optimizer step) captured once as a CUDA graph, then replayed.

Why: a QLoRA step of an 8B model issues ~4,100 kernel launches from Python, and on hosts with a slower
CPU the GPU waits for that thread: the step took 344-363 ms where its GPU work needs ~295
(benchmarks/RESULTS.md, thirteenth session). A replay is one launch, so the host is free at once.

What a captured step may do, and what this class checks or the caller promises:
- the inputs are CUDA tensors of fixed shapes and dtypes (checked: a step with other shapes runs
  eagerly); host-side values the step reads (a max sequence length, a count made on the host) are
  the same at every replay: the caller passes them as `key`, and a step with another key runs eagerly;
- no host sync, no host-side decision from device data inside the step (a capture fails loudly);
- the optimizer is capturable (Adam/AdamW are switched to `capturable=True`: their step counts
  already live on the GPU when fused);
- offloaded activations (train/activations.py, strategy "activations") are captured with their copies
  to fixed pinned buffers, which this object keeps alive; what such checkpointing still decides on the
  host (save_mlp "auto" timing forwards) must be settled first: capture waits until it is.
Not captured: the batch's trip to the GPU and anything looked up on the host (a CPU-held embedding):
the caller does that and hands the results in as inputs.

The fused LoRA kernels' cached bf16 adapter copies refresh at the first forward after each optimizer
step (kernels.cast_params): the capture records that refresh, so every replay refreshes them too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch


class StepGraph:
    """`step(key, **inputs)` runs `loss = loss_fn(**inputs); loss.backward(); optimizer.step()`: eagerly for
    the first `warmup` steps (allocations, autotuning, the optimizer's state), then captured once and
    replayed for every later step with the same key and input shapes. Returns the loss (a new tensor).

    `checkpoint`: the model's checkpoint function (an OffloadCheckpoint or None), asked whether it can be
    captured yet (`graph_blocker`), for its copy streams and its pinned buffers.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 checkpoint: Any = None, warmup: int = 2):
        self.loss_fn, self.optimizer, self.checkpoint = loss_fn, optimizer, checkpoint
        self.warmup = max(1, warmup)  # the optimizer's state and the kernels' caches exist only after a step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Hashable = None
        self.static: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        self.eager_steps = self.replays = 0
        self.why_eager: str | None = "warming up"  # why the last step ran eagerly (None: it replayed)
        self._keep: list[Any] = []  # what the graph reads or writes by address: gradients, pinned buffers
        self.failed: str | None = None  # why the capture failed (then every step runs eagerly)

    # ---------------------------------------------------------------- per step
    def step(self, key: Hashable = None, **inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            why = self._mismatch(key, inputs)
            if why is None:
                return self._replay(inputs)
            self.why_eager = why
            return self._eager(inputs)
        why = f"capture failed: {self.failed}" if self.failed else self._blocker(inputs)
        self.why_eager = why
        if why is not None:
            return self._eager(inputs)
        return self._capture(key, inputs)

    def _eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.graph is not None:  # the graph owns the gradient tensors: an eager step gets its own
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(**inputs)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.eager_steps += 1
        return loss.detach()

    def _replay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for k, v in inputs.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.loss.clone()

    # ---------------------------------------------------------------- capture
    def _blocker(self, inputs: dict[str, torch.Tensor]) -> str | None:
        if self.eager_steps < self.warmup:
            return "warming up"
        if not inputs or not all(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values()):
            return "the inputs are not all CUDA tensors"
        block = getattr(self.checkpoint, "graph_blocker", None)
        return block() if block is not None else None

    def _mismatch(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> str | None:
        if key != self.key:
            return f"key {key!r} is not the captured step's {self.key!r}"
        if inputs.keys() != self.static.keys():
            return f"inputs {sorted(inputs)} are not the captured step's {sorted(self.static)}"
        for k, v in inputs.items():
            s = self.static[k]
            if v.shape != s.shape or v.dtype != s.dtype or v.device != s.device:
                return f"input {k!r} is {tuple(v.shape)} {v.dtype}, the captured step's {tuple(s.shape)} {s.dtype}"
        return None

    def _capture(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        opt = self.optimizer
        device = next(iter(inputs.values())).device
        for group in opt.param_groups:
            if "capturable" in group:
                group["capturable"] = True
        for state in opt.state.values():  # capturable Adam keeps its step counts on the device
            step = state.get("step")
            if isinstance(step, torch.Tensor) and not step.is_cuda:
                state["step"] = step.to(device)
        opt.zero_grad(set_to_none=True)  # the captured backward makes the gradients: replays overwrite them
        self.static = {k: _static_copy(v) for k, v in inputs.items()}
        streams = self.checkpoint.side_streams() if hasattr(self.checkpoint, "side_streams") else []
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                main = torch.cuda.current_stream()
                for s in streams:  # the copy streams join the capture here and rejoin it at the end
                    s.wait_stream(main)
                loss = self.loss_fn(**self.static)
                loss.backward()
                opt.step()
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
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            self.why_eager = f"capture failed: {self.failed}"
            return self._eager(inputs)
        self.graph, self.key, self.loss = graph, key, loss.detach()
        self._keep = [p.grad for g in opt.param_groups for p in g["params"]]
        pool = getattr(self.checkpoint, "pool", None)
        if pool is not None:  # the graph copies to and from these host buffers by address
            self._keep += [*pool.registered, *pool.free]
        graph.replay()  # capturing ran nothing: this step's work
        self.replays += 1
        return self.loss.clone()


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """A clone that keeps t's host copy (kernels.with_host_copy): host-side readers inside the step see
    the values they saw when capturing, the values the key vouches for."""
    from ..kernels import host_copy, with_host_copy

    out = t.detach().clone()
    host = host_copy(t)
    if host is not None:
        with_host_copy(out, host.clone())
    return out


__all__ = ["StepGraph"]
