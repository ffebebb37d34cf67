"""Frozen quantized weights streamed from host memory, block by block (gradient checkpointing "offload").

`WeightStream` takes the frozen 4-bit weights (quant.NF4Weight buffers) of chosen decoder blocks to
pinned host memory. A block's weights come back to the GPU for its forward and for its backward only,
copied on the offload's copy-back stream one block ahead, and go again when the block is done: the
GPU holds at most two streamed blocks' weights at a time.

Why: the NF4 weights of an 8B model (3.35 GiB) sit on the GPU through the whole step, while a block
uses its own 112 MB for a few milliseconds of forward and of backward. Each streamed block costs twice
its weights in host-to-device traffic per step. Measured (H200, 8B, 2 x 2048 tokens, benchmarks/
RESULTS.md): a memory lever, not a speed one. 25 of 32 blocks took the peak from 6.66 to 4.25 GiB at
~4% fewer tokens/s, all 32 (none kept) to 2.92 GiB at ~6% fewer; spending the freed memory on kept
activations and gate/up won nothing back, because PCIe carries ~87 GB/s both ways at once against
~55 one way, so the weights coming in slow the activations going out in the forward.

Hooks on each streamed block call `enter(idx)` before its forward and `exit(idx)` after it (any
forward: training, evaluation); the checkpoint function (train/activations.py) adds `backward_hook(y,
idx)` on each block's output, which runs when that output's gradient is complete: block idx's backward
starts and block idx + 1's has ended. In backward, a block that is recomputed (offload strategy
"inputs") keeps its weights through its recompute and backward. `detach()` removes the hooks and
brings every weight back to the GPU for good (end of training: merging and export read them).

Not for generation: every forward of a streamed block copies its weights in (the trainer refuses it
with GRPO, whose rollouts run token by token).

`simulate=True` (tests on CPU) keeps "host" tensors and "GPU" clones on the CPU, with no streams.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.nn as nn


def quantized_buffers(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of every frozen quantized weight in `layer` (duck-typed on quant.NF4Weight:
    a module with `is_quantized` and `dequantize`)."""
    out = []
    for m in layer.modules():
        if getattr(m, "is_quantized", False) and hasattr(m, "dequantize"):
            out.extend((m, name) for name, b in m.named_buffers(recurse=False) if b is not None)
    return out


class WeightStream:
    """See the module docstring. `blocks`: index -> decoder block whose quantized weights stream.

    On the GPU the streamed weights live in two fixed slots (block idx in slot idx % 2), each as large
    as the largest streamed block: the footprint is exactly two blocks' weights, and the copies never
    go through the caching allocator (per-copy allocations on the copy stream, freed from the compute
    stream, left it holding about twice the step's peak in reserved memory)."""

    SLOTS = 2
    ALIGN = 256  # bytes: each buffer's offset in a slot (the kernels' vector loads want aligned starts)

    def __init__(self, blocks: dict[int, nn.Module], h2d_stream=None, simulate: bool = False):
        self.simulate = simulate
        self.backward_mode = False  # set by the backward hooks, cleared by the next training forward
        self._h2d = h2d_stream  # a callable giving the copy-back stream (shared with the activation offload)
        self.items: dict[int, list[tuple[nn.Module, str, torch.Tensor, int]]] = {}  # idx -> (module, name,
        self.device: torch.device | None = None                                   #   host copy, slot offset)
        self.resident: dict[int, list[torch.Tensor]] = {}  # idx -> device tensors, in item order
        self.events: dict[int, torch.cuda.Event] = {}  # idx -> its copy in is done (copy stream)
        self.slots: list[torch.Tensor] = []  # SLOTS flat uint8 GPU buffers
        self.slot_owner: list[int | None] = [None] * self.SLOTS
        self.slot_free: list[torch.cuda.Event | None] = [None] * self.SLOTS  # compute stream done with it
        self.blocks = {i: weakref.ref(b) for i, b in blocks.items()}
        self.host_bytes = 0
        self.handles = []
        for i, b in blocks.items():
            self.handles.append(b.register_forward_pre_hook(lambda mod, args, i=i: self.enter(i)))
            self.handles.append(b.register_forward_hook(lambda mod, args, out, i=i: self.exit(i)))

    # -- setup and teardown ------------------------------------------------------------------------
    def _take_all(self) -> None:
        """Every streamed block's quantized buffers move to (pinned) host memory, and the two slots are
        made, each as large as the largest block. apply_checkpointing calls it at once, so the memory is
        free before the first step; for a model not yet on the GPU it runs again at first use."""
        if self.items:
            return
        need, taken = 0, {}
        for idx, ref in self.blocks.items():
            block = ref()
            items, off = [], 0
            for m, name in quantized_buffers(block) if block is not None else []:
                t = getattr(m, name)
                if not (t.is_cuda or self.simulate):
                    continue
                if self.device is None:
                    self.device = t.device
                host = t.clone() if self.simulate else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                if not self.simulate:
                    host.copy_(t)
                setattr(m, name, host)
                nbytes = host.numel() * host.element_size()
                self.host_bytes += nbytes
                items.append((m, name, host, off))
                off += -(-nbytes // self.ALIGN) * self.ALIGN
            taken[idx] = items
            need = max(need, off)
        if not any(taken.values()):  # still on the CPU (moved to the GPU later): taken at first use then
            return
        self.items = taken
        if need and not self.simulate:
            self.slots = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(self.SLOTS)]

    def detach(self) -> None:
        """Hooks off; every streamed weight back on the GPU for good (in its own tensors, not a slot)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.slots:
            torch.cuda.current_stream(self.device).synchronize()
        for items in self.items.values():
            for m, name, host, _ in items:
                setattr(m, name, host.clone() if self.simulate else host.to(self.device))
        self.items.clear()
        self.resident.clear()
        self.events.clear()
        self.blocks.clear()
        self.slots = []
        self.slot_owner = [None] * self.SLOTS
        self.slot_free = [None] * self.SLOTS
        self.host_bytes = 0

    # -- copies ------------------------------------------------------------------------------------
    def prefetch(self, idx: int) -> None:
        """Start copying block idx's weights into its slot (no-op if not streamed or already there)."""
        if idx not in self.blocks:
            return
        self._take_all()
        if idx in self.resident or not self.items.get(idx):
            return
        if self.simulate:
            self.resident[idx] = [h.clone() for _, _, h, _ in self.items[idx]]
            return
        s = idx % self.SLOTS
        owner = self.slot_owner[s]
        if owner is not None and owner != idx:  # an access out of the usual order: the slot's block goes
            self.release(owner)
        stream = self._h2d()
        slot = self.slots[s]
        with torch.cuda.stream(stream):
            if self.slot_free[s] is not None:  # the kernels reading the slot's last block have run
                stream.wait_event(self.slot_free[s])
            gpu = []
            for _, _, h, off in self.items[idx]:
                nbytes = h.numel() * h.element_size()
                t = slot[off:off + nbytes].view(h.dtype).view(h.shape)
                t.copy_(h, non_blocking=True)
                gpu.append(t)
            ev = torch.cuda.Event()
            ev.record(stream)
        self.resident[idx] = gpu
        self.events[idx] = ev
        self.slot_owner[s] = idx

    def load(self, idx: int) -> None:
        """Block idx's weights on the GPU, in its modules, ready for kernels on the current stream."""
        if idx not in self.blocks:
            return
        self.prefetch(idx)
        gpu = self.resident.get(idx)
        if gpu is None:
            return
        ev = self.events.pop(idx, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        for (m, name, _, _), t in zip(self.items[idx], gpu):
            setattr(m, name, t)

    def release(self, idx: int) -> None:
        """Block idx's modules point at the host copies again; its slot is free for another block once
        the kernels already queued on the compute stream have run."""
        gpu = self.resident.pop(idx, None)
        if gpu is None:
            return
        self.events.pop(idx, None)
        for m, name, host, _ in self.items[idx]:
            setattr(m, name, host)
        if not self.simulate:
            s = idx % self.SLOTS
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.slot_free[s] = ev
            if self.slot_owner[s] == idx:
                self.slot_owner[s] = None

    def release_all(self, keep: Iterable[int] = ()) -> None:
        keep = set(keep)
        for idx in [i for i in self.resident if i not in keep]:
            self.release(idx)

    # -- the checkpoint function's calls -----------------------------------------------------------
    def new_forward(self) -> None:
        """A training forward starts (the checkpoint function, block 0): out of backward mode, and
        whatever the last backward left goes, but block 0's (it is next)."""
        self.backward_mode = False
        self.release_all(keep=(0,))

    def enter(self, idx: int) -> None:
        """Before block idx's forward: its weights in, the next block's on their way (in backward, a
        recompute: its weights are in already and stay)."""
        self.load(idx)
        if not (self.backward_mode and torch.is_grad_enabled()):
            self.prefetch(idx + 1)

    def exit(self, idx: int) -> None:
        """After block idx's forward (in backward, a recompute: its backward follows, nothing goes)."""
        if not (self.backward_mode and torch.is_grad_enabled()):
            self.release(idx)

    def backward_hook(self, y: torch.Tensor, idx: int) -> None:
        """Block idx's backward starts when y's gradient is complete: block idx + 1's weights go, idx's
        come in, idx - 1's start coming."""
        if not y.requires_grad or not any(i in self.blocks for i in (idx - 1, idx, idx + 1)):
            return
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            ws = ref()
            if ws is not None:
                ws.backward_mode = True
                ws.release(idx + 1)
                ws.load(idx)
                ws.prefetch(idx - 1)

        y.register_hook(hook)


def first_blocks(num_layers: int, keep_on_gpu: int, count: int) -> list[int]:
    """The blocks whose weights stream: the first `count` of the offloaded ones (their backward comes last,
    so their weights would sit on the GPU longest)."""
    n_off = num_layers - min(max(keep_on_gpu, 0), num_layers)
    return list(range(min(max(count, 0), n_off)))


__all__ = ["WeightStream", "first_blocks", "quantized_buffers"]
