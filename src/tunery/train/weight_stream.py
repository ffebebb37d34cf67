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


def _movable(block: nn.Module | None, simulate: bool) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of the block's quantized buffers that live on the GPU (any, simulating)."""
    if block is None:
        return []
    return [(m, n, getattr(m, n)) for m, n in quantized_buffers(block) if getattr(m, n).is_cuda or simulate]


def _put(m: nn.Module, name: str, t: torch.Tensor) -> None:
    """Point buffer `name` of m at t. Straight into the buffer dict: nn.Module.__setattr__ runs its type
    checks and register_buffer each time, ~16 us under cProfile on an H200's host, and gap mode moves
    28 buffers per block up to three times a step (~3,400 calls per 8B step)."""
    m._buffers[name] = t


def quantized_buffers(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of every frozen quantized weight in `layer` (duck-typed on quant.NF4Weight:
    a module with `is_quantized` and `dequantize`)."""
    out = []
    for m in layer.modules():
        if getattr(m, "is_quantized", False) and hasattr(m, "dequantize"):
            out.extend((m, name) for name, b in m.named_buffers(recurse=False) if b is not None)
    return out


ALIGN = 256  # bytes: each buffer's offset in a flat buffer (the kernels' vector loads want aligned starts)


def flat_offsets(tensors: Iterable[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in one flat uint8 buffer (ALIGN-aligned starts), and the buffer's size."""
    offsets, off = [], 0
    for t in tensors:
        offsets.append(off)
        off += _aligned(t.numel() * t.element_size())
    return offsets, off


def flat_view(flat: torch.Tensor, off: int, like: torch.Tensor) -> torch.Tensor:
    """The tensor shaped and typed as `like` at byte `off` of the flat buffer (no view op that changes
    nothing: a dropped block's 28 buffers are viewed anew at each return, on the CPU's critical path)."""
    t = flat[off:off + like.numel() * like.element_size()]
    if like.dtype != flat.dtype:
        t = t.view(like.dtype)
    return t if t.shape == like.shape else t.view(like.shape)


class WeightStream:
    """See the module docstring. `blocks`: index -> decoder block whose quantized weights stream.

    On the GPU the streamed weights live in two fixed slots (block idx in slot idx % 2), each as large
    as the largest streamed block: the footprint is exactly two blocks' weights, and the copies never
    go through the caching allocator (per-copy allocations on the copy stream, freed from the compute
    stream, left it holding about twice the step's peak in reserved memory)."""

    SLOTS = 2

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
            found = _movable(ref(), self.simulate)
            offsets, size = flat_offsets(t for _, _, t in found)
            items = []
            for (m, name, t), off in zip(found, offsets):
                self.device = t.device
                host = t.clone() if self.simulate else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                if not self.simulate:
                    host.copy_(t)
                _put(m, name, host)
                self.host_bytes += host.numel() * host.element_size()
                items.append((m, name, host, off))
            taken[idx] = items
            need = max(need, size)
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
                _put(m, name, host.clone() if self.simulate else host.to(self.device))
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
                t = flat_view(slot, off, h)
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
            _put(m, name, t)

    def release(self, idx: int) -> None:
        """Block idx's modules point at the host copies again; its slot is free for another block once
        the kernels already queued on the compute stream have run."""
        gpu = self.resident.pop(idx, None)
        if gpu is None:
            return
        self.events.pop(idx, None)
        for m, name, host, _ in self.items[idx]:
            _put(m, name, host)
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

    def after_forward(self, idx: int) -> None:
        """(The exit hook already let the block's weights go.)"""

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
        if any(i in self.blocks for i in (idx - 1, idx, idx + 1)):
            at_backward_start(y, self, idx)

    def backward_start(self, idx: int) -> None:
        """Block idx's backward starts: block idx + 1's weights go, idx's come in, idx - 1's start coming."""
        self.backward_mode = True
        self.release(idx + 1)
        self.load(idx)
        self.prefetch(idx - 1)


class WeightGap:
    """offload_weights_mode "gap": the first N blocks' frozen quantized weights leave the GPU after their
    training forward and come back during the backward, where they stay through the next forward.

    Why: the step's memory peaks at the loss and as the backward starts, where the early blocks' weights
    wait unused for their backward, last of all. A pinned host copy made once means leaving costs no
    copy. They come back in `gap_returns`' order during the kept blocks' backward, where the host-to-
    device direction carries no activations, on a stream of their own (so the activations' copies back
    never queue behind them): PCIe carries N blocks' weights once per step, one way, and the forward
    none (WeightStream's copies in the forward slow the activations going out). The end of the backward
    holds every weight again, but no kept activation.

    Any forward of a dropped block (evaluation, generation, a forward with no backward) brings its
    weights back first (a forward pre-hook), so nothing reads host memory; only OffloadCheckpoint's
    training path calls `after_forward`. `simulate=True` (tests on CPU) keeps "host" and "GPU" copies
    on the CPU, with no streams."""

    def __init__(self, blocks: dict[int, nn.Module], num_layers: int, keep_on_gpu: int = 0, simulate: bool = False):
        self.simulate = simulate
        self.backward_mode = False
        self.blocks = {i: weakref.ref(b) for i, b in blocks.items()}
        self.schedule = gap_returns(num_layers, len(blocks), keep_on_gpu)
        # one flat buffer per block, on the host and (while there) on the GPU, its buffers views into it:
        # one copy, allocation, stream mark and free per block, not 28 (7 linears x 4). Gap's forward was
        # seen waiting on the host (H200, 8B: 3.4-6 ms a dropped block against 3.2 when GPU-bound), and
        # still is on some machines (benchmarks/RESULTS.md, twelfth session)
        self.items: dict[int, list[tuple[nn.Module, str, torch.Tensor, int]]] = {}  # idx -> (module, name,
        self.host: dict[int, torch.Tensor] = {}  # idx -> its pinned flat buffer      #   host view, offset)
        self.gpu: dict[int, list[torch.Tensor]] = {}  # idx -> its device tensors while on the GPU
        self.flat: dict[int, torch.Tensor] = {}  # idx -> the flat device buffer they view (once copied in)
        self.events: dict[int, torch.cuda.Event] = {}  # copies in the compute stream has not waited for yet
        self.device: torch.device | None = None
        self.host_bytes = 0
        self._stream = None
        self.handles = [b.register_forward_pre_hook(lambda mod, args, i=i: self.load(i)) for i, b in blocks.items()]

    def _take_all(self) -> None:
        """Pinned host copies of every dropped block's quantized buffers (the GPU ones stay, for now)."""
        if self.items:
            return
        taken, host, gpu = {}, {}, {}
        for idx, ref in self.blocks.items():
            found = _movable(ref(), self.simulate)
            if not found:
                continue
            gpu[idx] = [t for _, _, t in found]
            offsets, size = flat_offsets(t for _, _, t in found)
            flat = torch.zeros(size, dtype=torch.uint8, pin_memory=not self.simulate)
            items = []
            for (m, name, t), off in zip(found, offsets):
                self.device = t.device
                view = flat_view(flat, off, t)
                view.copy_(t)
                items.append((m, name, view, off))
            self.host_bytes += size
            taken[idx], host[idx] = items, flat
        if taken:  # none yet: still on the CPU (moved later), taken at first use then
            self.items, self.host, self.gpu = taken, host, gpu

    def fetch(self, idx: int) -> None:
        """Start copying block idx's weights back (no-op if they are on the GPU): one flat copy, its memory
        from the copy stream's pool, so it waits for nothing on the compute stream."""
        self._take_all()
        if idx in self.gpu or not self.items.get(idx):
            return
        if self.simulate:
            flat = self.host[idx].clone()
        else:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._stream):
                flat = torch.empty_like(self.host[idx], device=self.device).copy_(self.host[idx], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._stream)
            self.events[idx] = ev
        self.flat[idx] = flat
        self.gpu[idx] = [flat_view(flat, off, h) for _, _, h, off in self.items[idx]]

    def load(self, idx: int) -> None:
        """Block idx's weights on the GPU and in its modules, ready for kernels on the current stream."""
        self._take_all()
        if not self.items.get(idx):
            return
        self.fetch(idx)
        ev = self.events.pop(idx, None)
        if ev is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(ev)
            self.flat[idx].record_stream(main)  # freed (after the next forward) only once the kernels reading it ran
        m, name, _, _ = self.items[idx][0]
        if m._buffers[name] is self.gpu[idx][0]:  # in place already (a training forward loads, then its pre-hook)
            return
        for (m, name, _, _), t in zip(self.items[idx], self.gpu[idx]):
            _put(m, name, t)

    def device_ptrs(self, idx: int) -> set[int]:
        """Addresses of block idx's weights on the GPU now (empty while they are away)."""
        if idx in self.flat:
            return {self.flat[idx].untyped_storage().data_ptr()}
        return {t.untyped_storage().data_ptr() for t in self.gpu.get(idx, ())}

    def drop(self, idx: int) -> None:
        """Block idx's modules point at the host copies; its GPU memory goes back to the allocator."""
        self.load(idx)  # a copy in never waited for must land (and be marked used) before the memory goes
        self.gpu.pop(idx, None)
        self.flat.pop(idx, None)
        for m, name, host, _ in self.items.get(idx, ()):
            _put(m, name, host)

    def new_forward(self) -> None:
        self.backward_mode = False

    def after_forward(self, idx: int) -> None:
        """A training forward of block idx is queued: its weights leave until `gap_returns` brings them."""
        if not self.backward_mode and idx in self.blocks:
            self._take_all()
            if idx in self.gpu:
                self.drop(idx)

    def backward_hook(self, y: torch.Tensor, idx: int) -> None:
        if idx in self.schedule or idx in self.blocks:
            at_backward_start(y, self, idx)

    def backward_start(self, idx: int) -> None:
        """Block idx's backward starts: the dropped blocks due then start coming back, and idx's own
        weights (if it is one) are made ready."""
        self.backward_mode = True
        for i in self.schedule.get(idx, ()):
            self.fetch(i)
        self.load(idx)

    def detach(self) -> None:
        """Hooks off; every dropped weight back on the GPU for good."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for idx in list(self.items):
            self.load(idx)
        self.items.clear()
        self.host.clear()
        self.gpu.clear()
        self.flat.clear()
        self.events.clear()
        self.blocks.clear()
        self.host_bytes = 0


LEND_LAG = 2  # blocks between the last region a block may borrow and the block itself (the restore's head start)


class WeightLend:
    """offload_weights_mode "lend": every block's frozen quantized weights stay at fixed GPU addresses, in
    one arena in block order; between a block's training forward and its backward their bytes hold the
    gate/up of later blocks, and come back from a pinned host copy before that backward.

    Why: the step is power-bound on an H200 (benchmarks/RESULTS.md, sixteenth session): removing idle
    time did not make it faster, less work does. The fused MLP's gate/up recompute is ~18% of an 8B
    QLoRA step's GEMMs, and keeping them costs 235 MB a block that the 7 GiB budget does not have; the
    early blocks' 4-bit weights (112 MB a block) sit unused from their forward to their backward.
    Unlike "gap" nothing is allocated or freed and no module's buffer changes: a CUDA graph captures the
    copies (host-side waits and moving addresses kept "gap" out of capture).

    The arena fills from its start as the forward goes (a bump pointer; block k may use the regions of
    blocks < k - LEND_LAG, whose forward is done). A block takes it when both its gate and up fit
    (`can_take`); OffloadCheckpoint then runs its MLP without the recompute and its pack hook sends the
    two [tokens, intermediate] tensors here (`take`). In backward, once every block that borrowed a
    region has run its backward, the region's bytes are copied back from the host on a stream of their
    own, and the compute stream waits for them when the region's block's backward starts; the regions
    a block borrows end LEND_LAG blocks before it, so that copy has two blocks of backward to hide behind.

    A forward of a block whose region is still lent to a pending backward (two forwards before one
    backward) raises: run backward after each training forward, or use "gap". A lent region whose
    borrowers' graph is gone (a forward never followed by backward) is restored, synchronously, by the
    block's next forward. `simulate=True` (tests on CPU) keeps the "GPU" arena and host copy on the CPU.
    """

    def __init__(self, blocks: dict[int, nn.Module], lag: int = LEND_LAG, simulate: bool = False):
        self.simulate = simulate
        self.lag = lag
        self.blocks = {i: weakref.ref(b) for i, b in blocks.items()}
        self.regions: dict[int, tuple[int, int]] = {}  # block -> (start, end) bytes in the arena
        self.arena: torch.Tensor | None = None  # flat uint8, on the GPU
        self.host: torch.Tensor | None = None  # its pinned host copy
        self.device: torch.device | None = None
        self.host_bytes = 0
        self.ptr = 0  # the arena's next free byte in this forward
        self.closed = False  # this forward lends nothing (an earlier forward's backward is pending)
        self.taking: int | None = None  # the block whose gate/up go to the arena now
        self.rows = self.inter = 0
        self.start = 0
        self.borrowed: dict[int, list[weakref.ref]] = {}  # borrower block -> its arena tensors (weakly)
        self.dirty: dict[int, int] = {}  # lent block -> its earliest borrower (the last to run backward)
        self.events: dict[int, torch.cuda.Event] = {}  # block -> its region's copy back
        self.lent_blocks = 0  # blocks that took the arena in the last forward
        self._stream = None
        self.handles = [b.register_forward_pre_hook(lambda mod, args, i=i: self.ensure(i)) for i, b in blocks.items()]

    # -- setup and teardown ------------------------------------------------------------------------
    def _take_all(self) -> None:
        """The blocks' quantized buffers moved into one GPU arena in block order, with a pinned host copy:
        to the host first and the GPU tensors freed, then the arena made, so the weights never exist twice
        on the GPU."""
        if self.arena is not None:
            return
        found = {i: _movable(ref(), self.simulate) for i, ref in sorted(self.blocks.items())}
        tensors = [t for items in found.values() for _, _, t in items]
        if not tensors:  # still on the CPU (moved to the GPU later): taken at first use then
            return
        offsets, size = flat_offsets(tensors)
        self.device = tensors[0].device
        host = torch.empty(size, dtype=torch.uint8, pin_memory=not self.simulate)
        placed, k = [], 0  # (module, buffer name, its host view, offset): no reference to the GPU tensor kept
        for idx, items in found.items():
            lo = offsets[k] if items else None
            for m, name, t in items:
                view = flat_view(host, offsets[k], t)
                view.copy_(t)
                _put(m, name, view)
                placed.append((m, name, view, offsets[k]))
                k += 1
            if items:
                self.regions[idx] = (lo, offsets[k] if k < len(offsets) else size)
        del found, tensors, items, t  # the GPU originals go before the arena exists
        arena = host.clone() if self.simulate else torch.empty(size, dtype=torch.uint8, device=self.device)
        if not self.simulate:
            arena.copy_(host)
        for m, name, t, off in placed:
            _put(m, name, flat_view(arena, off, t))
        self.arena, self.host, self.host_bytes = arena, host, size

    def detach(self) -> None:
        """Hooks off; every lent region restored (the weights stay in the arena)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for j in list(self.dirty):
            self._restore(j)
        for j in list(self.events):
            self._wait(j)
        self.borrowed.clear()

    # -- forward -----------------------------------------------------------------------------------
    def new_forward(self) -> None:
        """A training forward starts (block 0): the arena fills from its start, unless an earlier
        forward's gate/up still wait in it for their backward (then this forward borrows nothing)."""
        self._take_all()
        self._forget_dead()
        self.closed = bool(self.borrowed)
        if not self.closed:
            self.ptr = 0
        self.lent_blocks = 0

    def limit(self, idx: int) -> int:
        """Arena bytes block idx may fill: up to the end of block idx - 1 - lag's region."""
        j = idx - 1 - self.lag
        while j >= 0 and j not in self.regions:
            j -= 1
        return self.regions[j][1] if j >= 0 else 0

    def can_take(self, idx: int, nbytes: int) -> bool:
        """Block idx's gate/up (`nbytes` in all) fit in the arena now."""
        if self.closed or self.arena is None:
            return False
        return _aligned(self.ptr) + nbytes + ALIGN <= self.limit(idx)

    def begin(self, idx: int, rows: int, inter: int) -> None:
        self.taking, self.rows, self.inter, self.start = idx, rows, inter, self.ptr

    def take(self, t: torch.Tensor) -> torch.Tensor | None:
        """A tensor the taking block saves for backward: its copy in the arena if it is gate or up (a
        contiguous [rows, intermediate] tensor) and fits, else None."""
        if self.taking is None or t.dim() != 2 or t.shape[0] != self.rows or t.shape[1] != self.inter \
                or not t.is_contiguous() or t.requires_grad:
            return None
        start = _aligned(self.ptr)
        end = start + t.numel() * t.element_size()
        if end > self.limit(self.taking):
            return None
        view = flat_view(self.arena, start, t)
        view.copy_(t)
        self.ptr = end
        self.borrowed.setdefault(self.taking, []).append(weakref.ref(view))
        return view

    def end(self, idx: int) -> None:
        """Block idx's forward is over: the regions under what it took are lent to it."""
        self.taking = None
        if self.ptr == self.start:
            return
        self.lent_blocks += 1
        for j, (lo, hi) in self.regions.items():
            if lo < self.ptr and hi > self.start:
                self.dirty[j] = min(self.dirty.get(j, idx), idx)

    def pack(self, t: torch.Tensor):
        """saved_tensors_hooks pack for a kept block that takes the arena. The other tensors are handed back
        as an alias with no graph node: one the saving op made itself (attention's output) would else tie
        that node to itself through its saved tensor, a cycle through C++ that no collector frees (the whole
        step's graph with it)."""
        v = self.take(t)
        if v is not None:
            return v
        return t if t.grad_fn is None else t.detach()

    def ensure(self, idx: int) -> None:
        """Any forward of block idx (a pre-hook): its weights must be in place."""
        if idx in self.dirty:
            self._forget_dead()
            if any(k > idx for k in self.borrowed):
                raise RuntimeError(
                    f"offload_weights_mode lend: a forward of block {idx} while its 4-bit weights' memory holds "
                    "gate/up that an earlier forward saved for its backward. Run backward after each training "
                    "forward, or use offload_weights_mode: gap")
            self._restore(idx)
        if idx in self.events:
            self._wait(idx)

    # -- backward ----------------------------------------------------------------------------------
    def backward_hook(self, y: torch.Tensor, idx: int) -> None:
        """Every block: a region lent later in this forward must be back before this block's backward."""
        if not self.closed:
            at_backward_start(y, self, idx)

    def backward_start(self, idx: int) -> None:
        """Block idx's backward starts, every later block's is done: the regions all of whose borrowers
        are done start coming back, and idx's own region must be back."""
        for k in [k for k in self.borrowed if k > idx]:
            del self.borrowed[k]
        for j in [j for j, first in self.dirty.items() if first > idx]:
            self._restore(j)
        if idx in self.events:
            self._wait(idx)

    def after_forward(self, idx: int) -> None:
        """(Nothing moves after a forward.)"""

    # -- copies ------------------------------------------------------------------------------------
    def _restore(self, j: int) -> None:
        lo, hi = self.regions[j]
        del self.dirty[j]
        if self.simulate:
            self.arena[lo:hi].copy_(self.host[lo:hi])
            return
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # its borrowers' kernels have run
        with torch.cuda.stream(stream):
            self.arena[lo:hi].copy_(self.host[lo:hi], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        self.events[j] = ev

    def _wait(self, j: int) -> None:
        ev = self.events.pop(j)
        torch.cuda.current_stream(self.device).wait_event(ev)

    def _forget_dead(self) -> None:
        """Borrowers whose saved tensors are all gone (their graph freed without a backward) hold nothing."""
        for k in [k for k, refs in self.borrowed.items() if all(r() is None for r in refs)]:
            del self.borrowed[k]

    @property
    def stream(self):
        """The copies back's own stream (made at first use)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def side_streams(self) -> list:
        return [] if self.simulate else [self.stream]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def at_backward_start(y: torch.Tensor, mover: WeightStream | WeightGap | WeightLend, idx: int) -> None:
    """mover.backward_start(idx) once y's gradient is complete, i.e. when block idx's backward starts
    (y: that block's output); the hook holds the mover weakly."""
    if not y.requires_grad:
        return
    ref = weakref.ref(mover)

    def hook(grad: torch.Tensor) -> None:
        m = ref()
        if m is not None:
            m.backward_start(idx)

    y.register_hook(hook)


def gap_returns(num_layers: int, dropped: int, keep_on_gpu: int = 0) -> dict[int, list[int]]:
    """WeightGap's schedule: backward-start block -> the dropped blocks (the first `dropped`) that start
    coming back then, block dropped - 1 (needed first) first. They come during the kept blocks'
    backward, from block L - 2's (L - 1's moment holds every kept block's activations, the step's
    backward peak) to block L - keep's: the host-to-device direction is idle there (only the last
    offloaded block's activations come back), where the offloaded blocks' backward already has it
    about half busy. Evenly spread, as many per block as it takes: the planner counts what that adds
    to each kept block's moment. With fewer than two kept blocks (or too few to stay ahead of the
    dropped ones' backward) they spread over the backward starts down to block `dropped`; with more
    than L - 2 dropped, all come at the start of block L - 1's backward."""
    n, L = min(max(0, dropped), num_layers), num_layers  # noqa: E741
    if n == 0:
        return {}
    if n > L - 2:  # too many to stay ahead: all at the last block's backward start (its peak; the planner counts it)
        return {L - 1: list(range(n - 1, -1, -1))}
    lo = L - min(max(keep_on_gpu, 0), L)
    if keep_on_gpu < 2 or lo < n:
        lo = n
    starts = L - 1 - lo  # backward starts L - 2 ... lo
    out: dict[int, list[int]] = {}
    for k in range(n):  # k-th return: block n - 1 - k; where several share a start, the later ones
        pos = (k * starts) // n if n <= starts else ((k + 1) * starts + n - 1) // n - 1
        out.setdefault(L - 2 - pos, []).append(n - 1 - k)
    return out


def first_blocks(num_layers: int, keep_on_gpu: int, count: int) -> list[int]:
    """The blocks whose weights stream: the first `count` of the offloaded ones (their backward comes last,
    so their weights would sit on the GPU longest)."""
    n_off = num_layers - min(max(keep_on_gpu, 0), num_layers)
    return list(range(min(max(count, 0), n_off)))


__all__ = ["WeightGap", "WeightLend", "WeightStream", "at_backward_start", "first_blocks", "gap_returns",
           "quantized_buffers"]
