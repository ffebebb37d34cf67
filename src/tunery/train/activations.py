"""Activation memory: per-block gradient checkpointing, checkpoints offloaded to CPU, chunked MLP.

`apply_checkpointing(model, mode)` sets `model.model.checkpoint_fn`, which the decoder calls as
`ckpt(layer, x, rope, cu_seqlens, max_seqlen)` for every block while training:

- `True`: torch.utils.checkpoint (non-reentrant) per block: only each block's input stays on the
  GPU (L x tokens x hidden x 2 bytes), the block is recomputed in backward.
- `"offload"`: the same recomputation, but each block's input goes to pinned CPU memory on a side
  stream during forward and comes back (prefetched one block ahead) during backward, so the GPU
  holds the inputs of at most `keep_on_gpu` (+2 in flight) blocks. A custom autograd function does
  this (it recomputes the block and runs its backward inside its own backward, the reentrant
  style), because torch's non-reentrant checkpoint keeps its inputs referenced on the device.
  Without CUDA it keeps the input as is (a plain recomputing checkpoint). With
  `offload="activations"` every large tensor a block saves goes to host memory instead (saved-tensor
  hooks, one group per block, prefetched one block ahead) and only the fused MLP's gate/up are
  recomputed: ~4.5x the PCIe traffic and host memory of "inputs", most of a forward less of compute
  (see OffloadCheckpoint). `save_mlp` lets chosen blocks keep gate/up too ("auto": as many as the
  copy time left in a measured forward carries).

`mlp_chunk=N` splits the MLP of rows longer than N tokens into chunks of N tokens that are each
recomputed in backward, so the [tokens x intermediate] tensors (3.5x the hidden size for Llama)
never exist for the whole row at once. The MLP is per-token, so the result is exact.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .weight_stream import WeightGap, WeightLend, WeightStream, first_blocks, quantized_buffers


# ------------------------------------------------------------------------------- recompute helper
class _Replay:
    """RNG and autocast state captured before a forward, to recompute it identically in backward."""

    def __init__(self, x: torch.Tensor):
        self.device_type = x.device.type
        self.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.device = x.device

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[self.device] if self.cuda_rng is not None else [])
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        enabled, dtype = self.autocast
        self._amp = torch.autocast(self.device_type, dtype=dtype, enabled=enabled)
        self._amp.__enter__()
        return self

    def __exit__(self, *exc):
        self._amp.__exit__(*exc)
        self._fork.__exit__(*exc)


def _backward_through(y: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward of a recomputed piece: accumulates parameter grads (and the input's .grad)."""
    if y.requires_grad:
        torch.autograd.backward(y, grad)


# ------------------------------------------------------------------------------- chunked MLP
class _ChunkedMLP(torch.autograd.Function):
    """Forward chunk by chunk without a graph; backward recomputes each chunk and backprops it.

    Keeps x, the output, grad_x and one chunk's intermediates; never a full [tokens x intermediate].
    """

    @staticmethod
    def forward(ctx, x, _needs_grad, dense, chunk):
        ctx.dense, ctx.chunk = dense, chunk
        ctx.replay = _Replay(x)
        ctx.save_for_backward(x)
        out = None
        for s in range(0, x.shape[0], chunk):
            y = dense(x[s : s + chunk])
            if out is None:
                out = y.new_empty(x.shape[0], y.shape[-1])
            out[s : s + chunk] = y
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if need_x else None
        with ctx.replay:
            for s in range(0, x.shape[0], ctx.chunk):
                part = x[s : s + ctx.chunk].detach().requires_grad_(need_x)
                with torch.enable_grad():
                    y = ctx.dense(part)
                _backward_through(y, grad_out[s : s + ctx.chunk])
                if need_x:
                    grad_x[s : s + ctx.chunk] = part.grad if part.grad is not None else 0
        return grad_x, None, None, None


_DUMMY: dict[torch.device, torch.Tensor] = {}


def _needs_grad_token(device: torch.device) -> torch.Tensor:
    """A leaf that requires grad: passed to the custom functions so their output is part of the graph
    (and their backward runs, for the adapter weights inside) even when the input needs no grad."""
    t = _DUMMY.get(device)
    if t is None:
        t = _DUMMY[device] = torch.zeros((), device=device, requires_grad=True)
    return t


def chunked_mlp(dense: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """dense(x) computed `chunk` tokens at a time; in backward each chunk is recomputed."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] <= chunk:
        return dense(x)
    if not torch.is_grad_enabled():
        return torch.cat([dense(flat[s : s + chunk]) for s in range(0, flat.shape[0], chunk)]).view(*shape[:-1], -1)
    out = _ChunkedMLP.apply(flat, _needs_grad_token(x.device), dense, chunk)
    return out.view(*shape[:-1], out.shape[-1])


def set_mlp_chunking(model: nn.Module, chunk: int | None) -> int:
    """Install (or with None remove) chunked MLPs in every decoder block. Returns the blocks changed.

    Uses the decoder's `mlp.chunk_fn` hook when the MLP has one (called as chunk_fn(dense, x)).
    Until then it sets instance-level `forward` and `forward_fused` (the fused norm+MLP path, which
    takes the residual stream and the norm) on our own MLP modules: parameters and names unchanged.
    """
    layers = _layers(model)
    for layer in layers:
        mlp = layer.mlp
        fn = functools.partial(_chunk_call, chunk=chunk) if chunk else None
        if hasattr(mlp, "chunk_fn"):
            mlp.chunk_fn = fn
            continue
        for name in ("forward", "forward_fused"):
            mlp.__dict__.pop(name, None)
            orig = getattr(type(mlp), name, None)
            if fn is None or orig is None:
                continue
            bound = orig.__get__(mlp)
            if name == "forward":
                mlp.forward = functools.partial(fn, bound)
            else:
                mlp.forward_fused = functools.partial(_chunk_fused, fn, bound)
    return len(layers)


def _chunk_fused(fn, bound, x, norm):
    return fn(lambda t: bound(t, norm), x)


def _chunk_call(dense, x, chunk):
    return chunked_mlp(dense, x, chunk)


# ------------------------------------------------------------------------------- pinned pool
class PinnedPool:
    """Reusable page-locked host buffers (exact sizes: torch's pinned allocator rounds to powers of 2,
    which for multi-GiB checkpoints nearly doubles host memory).

    Free buffers sit in buckets by size, so `get` costs a dict lookup (every step asks for the same
    sizes again); a request with no bucket of its size takes the smallest larger buffer. A linear scan
    over the free list cost ~100 us of Python per offloaded tensor with a few hundred buffers free,
    and the forward of an 8B model offloads ~200 tensors per step.
    """

    def __init__(self):
        self.buckets: dict[int, list[torch.Tensor]] = {}
        self.sizes: list[int] = []  # sorted keys of `buckets`
        self.total_bytes = 0
        self.registered: list[torch.Tensor] = []

    @property
    def free(self) -> list[torch.Tensor]:
        return [b for size in self.sizes for b in self.buckets[size]]

    def get(self, nbytes: int) -> torch.Tensor:
        bucket = self.buckets.get(_granule(nbytes))
        if not bucket:
            i = bisect.bisect_left(self.sizes, nbytes)
            bucket = next((self.buckets[s] for s in self.sizes[i:] if self.buckets[s]), None)
        if bucket:
            return bucket.pop()
        return self._alloc(nbytes)

    def put(self, buf: torch.Tensor) -> None:
        size = buf.numel()
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = []
            bisect.insort(self.sizes, size)
        bucket.append(buf)

    def put_all(self, bufs: list[torch.Tensor]) -> None:
        for b in bufs:
            self.put(b)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        size = _granule(nbytes)
        buf = torch.empty(size, dtype=torch.uint8)
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
        if err != 0:  # fall back to torch's pinned allocator
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        else:
            self.registered.append(buf)
            weakref.finalize(buf, _unregister, buf.data_ptr())
        self.total_bytes += size
        return buf

    def release(self) -> None:
        """Drop every free buffer (the host memory goes back after the next GC)."""
        free = self.free
        self.total_bytes -= sum(b.numel() for b in free)
        ids = {id(b) for b in free}
        self.registered = [b for b in self.registered if id(b) not in ids]
        self.buckets.clear()
        self.sizes.clear()


def _granule(nbytes: int) -> int:
    return -(-nbytes // (2 << 20)) * (2 << 20)  # 2 MiB granules so nearby sizes share buffers


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:
        pass


class _Saved:
    """One block input while the graph lives: on the GPU, or in a pinned buffer with a copy event."""

    def __init__(self, owner: OffloadCheckpoint, x: torch.Tensor, offload: bool):
        self.owner = owner
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.gpu: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self.event = self.copied = None
        if not offload:
            self.gpu = x
            return
        nbytes = x.numel() * x.element_size()
        stream = owner.stream
        self.host = owner.pool.get(nbytes)
        view = self.host[:nbytes].view(x.dtype).view(x.shape)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        stream.wait_stream(owner.h2d_stream)  # a pooled host buffer may still feed a copy back
        with torch.cuda.stream(stream):
            view.copy_(x, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        x.record_stream(stream)  # x's memory is not reused before the copy has read it
        weakref.finalize(self, owner.pool.put, self.host)

    def prefetch(self) -> None:
        if self.gpu is not None or self.host is None:
            return
        stream = self.owner.h2d_stream
        nbytes = self.shape.numel() * self.dtype.itemsize
        stream.wait_event(self.copied)
        with torch.cuda.stream(stream):
            gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            gpu.copy_(self.host[:nbytes].view(self.dtype).view(self.shape), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        self.gpu = gpu

    def load(self) -> torch.Tensor:
        self.prefetch()
        if self.event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(self.event)
            self.gpu.record_stream(main)
            self.event = None
        x, self.gpu = self.gpu, None
        return x


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, _needs_grad, run, saved_factory, prev_ref):
        ctx.run = run
        ctx.replay = _Replay(x)
        y = run(x)  # Function.forward runs without a graph
        ctx.saved = saved_factory(x)
        ctx.prev = prev_ref  # the block before this one, prefetched while this one recomputes
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x = ctx.saved.load().detach()
        prev = ctx.prev() if ctx.prev is not None else None
        if prev is not None:
            prev.prefetch()
        need_x = ctx.needs_input_grad[0]
        x.requires_grad_(need_x)
        with ctx.replay:
            with torch.enable_grad():
                y = ctx.run(x)
            _backward_through(y, grad_y)
        ctx.saved = ctx.run = None
        return (x.grad if need_x else None), None, None, None, None


class _Packed:
    """What the saved-tensor hook keeps for one offloaded tensor: its group and index."""

    __slots__ = ("group", "i", "shape", "stride")

    def __init__(self, group: _ActGroup, i: int, shape: torch.Size | None = None, stride: tuple[int, ...] = ()):
        # shape, stride: another view of item i's memory (same start, same dense span)
        self.group, self.i, self.shape, self.stride = group, i, shape, stride


class _ActGroup:
    """Every large tensor one block saves for backward, in pinned host memory (nothing recomputed but
    the fused MLP's gate/up, see OffloadCheckpoint._activations).

    The copies go out together on the side stream when the block's forward ends (one stream wait
    for all of them; the tensors are alive until then anyway) and come back together (prefetched
    while the next block's backward runs) when the first of them is needed. Parameters, small
    tensors and tensors shared by all blocks (rope tables, cu_seqlens) stay where they are.
    The per-tensor work is kept to a few Python operations: a block saves ~6 tensors and the
    forward of a 32-layer model runs this ~200 times per step, on the critical path when the GPU
    waits for the CPU.
    """

    def __init__(self, owner: OffloadCheckpoint, exclude: set[int], simulate: bool):
        self.owner, self.exclude, self.simulate = owner, exclude, simulate
        self.items: list[tuple[torch.Tensor, torch.Size, tuple[int, ...], torch.dtype, torch.device]] = []
        self.keys: dict[tuple, int] = {}
        self.gpu: list[torch.Tensor] | None = None
        self.event = self.copied = None  # copied: the copies out are done (the way back waits for it)
        self.own = False  # the copies back were allocated on the compute stream (under graph capture)
        self.idx = 0  # the block's index (OffloadCheckpoint._activations sets it)
        self.prev: weakref.ref | None = None
        self.bytes = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host view, device tensor) to copy
        self.bufs: list[torch.Tensor] = []
        weakref.finalize(self, owner.pool.put_all, self.bufs)  # the buffers go back when the graph dies

    def close(self) -> None:
        """The block's forward is over: copy its saved tensors out, drop the device references."""
        with torch.no_grad():  # copies of saved tensors, not part of any graph
            if self.pending and not self.pending[0][1].is_cuda:  # simulate (tests on CPU): plain copies
                for host, t in self.pending:
                    host.copy_(t)
            elif self.pending:
                stream = self.owner.stream
                main = torch.cuda.current_stream(self.pending[0][1].device)
                capturing = torch.cuda.is_current_stream_capturing()
                stream.wait_stream(main)
                stream.wait_stream(self.owner.h2d_stream)  # pooled host buffers may still feed copies back
                cal = self.owner._cal if self.owner._cal is not None and self.owner._cal.end is None else None
                with torch.cuda.stream(stream):
                    if cal is not None:
                        began = cal.event(stream)
                    for host, t in self.pending:
                        host.copy_(t, non_blocking=True)
                        if not capturing:
                            t.record_stream(stream)  # the block's memory is not reused before the copy has read it
                    self.copied = torch.cuda.Event()
                    self.copied.record(stream)
                    if cal is not None:
                        cal.copies.append((began, cal.event(stream)))
                        cal.bytes += self.bytes
                if capturing:  # record_stream would keep the memory until the capture ends (train/cuda_graph.py)
                    self.owner.hold(self.idx, self.copied, [t for _, t in self.pending])
        self.pending.clear()
        self.keys.clear()

    def pack(self, t: torch.Tensor):
        # cheapest tests first, no isinstance(t, nn.Parameter) (a Python-level metaclass check): a
        # parameter is a leaf that requires grad, or a frozen one (small, or excluded by pointer below).
        # Each tensor attribute read once: this runs for every tensor every block saves (~560 per step).
        if t.requires_grad and t.is_leaf:
            return t
        n, size = t.numel(), t.element_size()
        nbytes = n * size
        cuda = t.is_cuda
        if nbytes < self.owner.min_bytes or not (cuda or self.simulate) or type(t) is nn.Parameter:
            return t
        off = t.storage_offset()
        ptr = t.data_ptr() - off * size  # the storage's start (no storage object made)
        if ptr in self.exclude:
            return t
        shape, stride, dtype = t.shape, t.stride(), t.dtype
        contiguous = t.is_contiguous()
        if not contiguous:
            span = 1 + sum((k - 1) * abs(st) for k, st in zip(shape, stride))
            if span != n or any(st < 0 for st in stride):  # expanded / gapped views stay put
                return t
        key = (ptr, off, shape, stride, dtype)
        i = self.keys.get(key)
        if i is None:  # the same memory saved under another shape or layout (the attention output as
            # [B, H, T, D], a transposed view, by cuDNN and as [N, H * D] by o_proj): one copy, and a view
            # of it on the way back. Both are dense over the same span, so the host copy (made with the
            # first one's strides) is a byte image of that memory and any dense view of it is exact.
            j = self.keys.get((ptr, off, n, dtype))
            if j is not None:
                return _Packed(self, j, shape, stride)
        if i is None:
            # simulate (tests on CPU): a plain buffer, viewed the same way
            buf = self.owner.pool.get(nbytes) if cuda else torch.empty(nbytes, dtype=torch.uint8)
            if cuda:
                self.bufs.append(buf)
            host = torch.as_strided(buf[:nbytes].view(dtype), shape, stride)
            self.pending.append((host, t))  # copied (and the device tensor let go) in close()
            i = len(self.items)
            self.items.append((host, shape, stride, dtype, t.device))
            self.keys[key] = i
            self.keys.setdefault((ptr, off, n, dtype), i)
            self.bytes += nbytes
        return _Packed(self, i)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        g = packed.group
        g.load()
        prev = g.prev() if g.prev is not None else None
        for _ in range(PREFETCH_AHEAD):  # the next blocks' tensors start coming back
            if prev is None:
                break
            prev.prefetch()
            prev = prev.prev() if prev.prev is not None else None
        t = g.gpu[packed.i]
        return t if packed.shape is None else t.as_strided(packed.shape, packed.stride, t.storage_offset())

    def prefetch(self) -> None:
        if self.gpu is not None:
            return
        if not self.items or self.items[0][4].type != "cuda":  # nothing offloaded, or simulated on CPU
            self.gpu = [h.clone() for h, *_ in self.items]
            return
        stream = self.owner.h2d_stream
        if self.copied is not None:
            stream.wait_event(self.copied)
        if torch.cuda.is_current_stream_capturing():
            # allocated on the compute stream, which frees them: memory made on a side stream and used
            # on another is not reused until a capture ends (record_stream), and the whole backward's
            # activations would pile up. The copy waits for the compute stream's work so far, which may
            # still read this memory's last owner.
            self.gpu = [torch.empty_strided(shape, stride, dtype=dtype, device=dev)
                        for _, shape, stride, dtype, dev in self.items]
            self.own = True
            stream.wait_stream(torch.cuda.current_stream(self.gpu[0].device))
            with torch.cuda.stream(stream):
                for t, (h, *_) in zip(self.gpu, self.items):
                    t.copy_(h, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            return
        with torch.cuda.stream(stream):
            self.gpu = [torch.empty_strided(shape, stride, dtype=dtype, device=dev).copy_(h, non_blocking=True)
                        for h, shape, stride, dtype, dev in self.items]
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def load(self) -> None:
        if self.owner.held:  # under graph capture: the backward has begun, every copy out is waited for
            self.owner.release_held(None, self.items[0][4])
        self.prefetch()
        if self.event is not None:
            main = torch.cuda.current_stream(self.gpu[0].device)
            main.wait_event(self.event)
            if not self.own:
                for t in self.gpu:
                    t.record_stream(main)
            self.event = None


CALIBRATION_FORWARDS = 3  # save_mlp "auto": timed forwards, the shortest decides (one slow one, e.g. 200 ms
# against ~110 on an H200, once let 22 blocks of 22 keep gate/up: the copies out then held the step back)
CALIBRATION_SLEEP_CYCLES = 200_000_000  # GPU clock cycles before a timed forward: 0.1-0.13 s at 1.5-2 GHz
PREFETCH_LEAD = 2  # kept blocks of backward that the copy back of the last offloaded block overlaps
# offloaded blocks whose tensors start coming back when one block's backward starts. 2 gives a long copy
# (a block that kept gate/up) two blocks' backward, for one block's tensors more on the GPU there; on an
# H200 (8B QLoRA, RESULTS.md, sixteenth session) it ran 13,662 tok/s against 13,853 with 1, and with
# offload_weights_mode lend 14,000 against 13,950: the backward's copies are bound by PCIe, not by lead
PREFETCH_AHEAD = 1
# under graph capture: block i's copies out must be done when block i + 3 starts. 8 (with a byte cap) took the
# forward's ~9 ms a step of waits behind the gate/up blocks' copies away on an H200, and the step was no
# faster: it is power-bound, the kernels ran at lower clocks instead; and the peak rose 0.36 GiB (RESULTS.md,
# sixteenth session)
HOLD_BLOCKS = 3


class OffloadCheckpoint:
    """The `checkpoint_fn` for mode "offload". One instance per model; keeps a pinned host pool.

    Two strategies, picked per forward call by `strategy` ("inputs" by default):
    - "inputs": only each block's input goes to host memory; the block is recomputed in backward.
      Host memory L x u, PCIe traffic u per block each way, one extra forward of compute.
    - "activations": every large tensor the block saves goes to host memory and comes back; only
      the fused MLP's gate/up are recomputed in backward, except in the `save_mlp` blocks (keeping
      them adds 2 x intermediate / hidden units per block). Host memory and PCIe traffic ~4.5u per block each way (Llama: input, q, k, v,
      attention output, MLP input): faster when the copies hide behind the block's compute, i.e.
      for wide models (hidden >= 3072) and rows of moderate length (Llama-8B QLoRA at 2 x 2048 on
      an H200, three runs: 10.4k, 11.9k and 12.9k tokens/s against 10.7k-11.1k for "inputs";
      benchmarks/RESULTS.md).
    "auto" takes "activations" when the hidden size is >= 3072, the micro-batch has at most
    `auto_max_tokens` tokens and the host copies (estimated 6u per block) fit in half of the free
    host memory; "inputs" otherwise (long rows: host memory for 5u per block would run out).
    """

    def __init__(self, keep_on_gpu: int = 0, num_layers: int | None = None, strategy: str = "inputs",
                 auto_max_tokens: int = 32768, min_bytes: int = 1 << 20, simulate: bool = False,
                 save_mlp: Iterable[int] | str = (), save_kept: int = 0):
        if strategy not in ("auto", "inputs", "activations"):
            raise ValueError(f"offload strategy must be auto, inputs or activations, got {strategy!r}")
        self.keep_on_gpu = keep_on_gpu
        # strategy "activations": the blocks (indices) whose fused MLP keeps gate/up for backward (on the
        # GPU for a kept block, in host memory with the rest otherwise); every other block recomputes
        # them. "auto": picked from the shortest of three timed forwards (_calibrate), none until then.
        self.auto = save_mlp == "auto"
        self.save_kept = save_kept  # the last N kept blocks keep gate/up on the GPU (with "auto" too)
        kept = save_mlp_layers(num_layers, keep_on_gpu, save_kept) if num_layers else []
        self.save_mlp = frozenset(kept) if self.auto else frozenset(save_mlp) | frozenset(kept)
        self.auto_report: dict | None = None
        self._cal: _Calibration | None = None
        # (forward ms, copy ms, bytes copied, start-to-end span ms) of the finished timed forwards
        self._timed: list[tuple[float, float, int, float]] = []
        self._gate_up_bytes = 0
        self._forwards = 0
        self.num_layers = num_layers
        self.strategy = strategy
        self.auto_max_tokens = auto_max_tokens
        self.min_bytes = min_bytes
        self.simulate = simulate  # tests: exercise the activation path on CPU with plain copies
        self.pool = PinnedPool()
        self._stream = self._h2d = None
        self._last: weakref.ref | None = None
        self._last_group: weakref.ref | None = None
        self.layer_index: dict[int, int] = {}
        self.weights: WeightStream | WeightGap | None = None  # offload_weights: frozen 4-bit weights (weight_stream.py)
        # under graph capture: (copy-out event, tensors) of the latest blocks, kept alive until the compute
        # stream has waited for their copies out (hold, release_held)
        self.held: collections.deque[tuple[int, Any, list[torch.Tensor]]] = collections.deque()
        self._param_ptrs: dict[int, set[int]] = {}
        self.last_strategy: str | None = None

    @property
    def stream(self):
        """Side stream of the copies to host memory."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    @property
    def h2d_stream(self):
        """Side stream of the copies back: its own, so a copy back never queues behind copies out that
        are still draining (PCIe runs both ways at once); each waits for its own tensors' copy out."""
        if self._h2d is None:
            self._h2d = torch.cuda.Stream()
        return self._h2d

    def pick(self, x: torch.Tensor) -> str:
        if self.strategy != "auto":
            return self.strategy
        if not (x.is_cuda or self.simulate):
            return "inputs"
        hidden = x.shape[-1]
        tokens = x.numel() // hidden
        layers = self.num_layers or 1
        host_need = 6 * x.numel() * x.element_size() * layers
        if hidden >= 3072 and tokens <= self.auto_max_tokens and host_need <= _host_free() // 2:
            return "activations"
        return "inputs"

    def __call__(self, layer: nn.Module, x: torch.Tensor, rope: Any, cu_seqlens: torch.Tensor | None,
                 max_seqlen: int | None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return layer(x, rope, cu_seqlens, max_seqlen)
        idx = self.layer_index.get(id(layer), 0)
        if self.held:
            self.release_held(idx - HOLD_BLOCKS, x.device)
        ws = self.weights
        if ws is None:
            return self._call(layer, x, rope, cu_seqlens, max_seqlen, idx)
        ws.simulate = self.simulate
        if idx == 0:
            ws.new_forward()
        if isinstance(ws, WeightGap):  # on the GPU before the block's offload looks up its weights' addresses
            ws.load(idx)
        y = self._call(layer, x, rope, cu_seqlens, max_seqlen, idx)
        ws.backward_hook(y, idx)  # the block's weights come back when its backward starts
        ws.after_forward(idx)
        return y

    # ---- CUDA graph capture of a whole step (train/cuda_graph.py) ----
    def graph_blocker(self) -> str | None:
        """Why a step through this checkpointing cannot be captured as a CUDA graph now; None if it can.
        A captured step replays its launches with no host code: what the host decides per step (timing
        forwards, streamed weights' waits, the inputs strategy's side-stream memory) must be settled."""
        if self.auto:
            return "offload_save_mlp auto is still timing forwards"
        if self.weights is not None and not isinstance(self.weights, WeightLend):
            return "offload_weights moves weights with host-side waits (offload_weights_mode lend does not)"
        if self.last_strategy not in (None, "activations"):
            return f"offload strategy {self.last_strategy!r} (only 'activations' is captured)"
        return None

    def side_streams(self) -> list:
        """The copy streams, which a capture forks from and joins back to its own."""
        lend = self.weights.side_streams() if isinstance(self.weights, WeightLend) else []
        return [self.stream, self.h2d_stream, *lend]

    def hold(self, idx: int, event, tensors: list[torch.Tensor]) -> None:
        """Under capture: keep block idx's offloaded tensors alive until the compute stream has waited
        for their copies out (when block idx + HOLD_BLOCKS starts, kept blocks counted, or when the
        backward begins), instead of record_stream, whose memory a capture never reuses."""
        self.held.append((idx, event, tensors))

    def release_held(self, upto: int | None, device: torch.device) -> None:
        """The compute stream waits for the copies out of the held blocks up to index `upto` (None: all),
        and lets their memory go."""
        main = torch.cuda.current_stream(device)
        while self.held and (upto is None or self.held[0][0] <= upto):
            _, event, _ = self.held.popleft()
            main.wait_event(event)

    def stop_streaming(self) -> None:
        """offload_weights off: hooks removed, every streamed weight back on the GPU for good."""
        if self.weights is not None:
            self.weights.detach()
            self.weights = None

    def _call(self, layer: nn.Module, x: torch.Tensor, rope: Any, cu_seqlens: torch.Tensor | None,
              max_seqlen: int | None, idx: int) -> torch.Tensor:
        first = idx == 0
        offload = (x.is_cuda or self.simulate) and (self.num_layers is None or idx < self.num_layers - self.keep_on_gpu)
        strategy = self.pick(x)
        self.last_strategy = strategy
        if strategy == "activations":
            if self.auto and x.is_cuda:
                self._calibrate(layer, x, idx)
                if self._cal is not None and self._cal.end is None and idx > 0:
                    self._cal.blocks.append(self._cal.event(torch.cuda.current_stream(x.device)))
            lend = self._lend_to(layer, x, idx)
            if not offload:  # a kept block: its tensors stay on the GPU
                with _MLPRecompute(layer, idx not in self.save_mlp and lend is None), \
                        (torch.autograd.graph.saved_tensors_hooks(lend.pack, _same) if lend else contextlib.nullcontext()):
                    y = layer(x, rope, cu_seqlens, max_seqlen)
                self._prefetch_after_kept(y, idx)
            else:
                y = self._activations(layer, x, rope, cu_seqlens, max_seqlen, first, idx, lend)
            if lend is not None:
                lend.end(idx)
            if self._cal is not None and self._cal.end is None and idx == (self.num_layers or 1) - 1:
                self._cal.end = self._cal.event(torch.cuda.current_stream(x.device))
            return y
        holder: list[_Saved] = []

        def factory(t):
            s = _Saved(self, t, offload and x.is_cuda)
            holder.append(s)
            return s

        def run(t):
            return layer(t, rope, cu_seqlens, max_seqlen)

        prev = None if first else self._last
        y = _OffloadedBlock.apply(x, _needs_grad_token(x.device), run, factory, prev)
        self._last = weakref.ref(holder[0])
        return y

    def _prefetch_after_kept(self, y: torch.Tensor, idx: int) -> None:
        """Backward reaches the last offloaded block right after the kept ones: start copying it back
        when the backward of the kept block PREFETCH_LEAD blocks before it begins (a hook on that block's
        output), not at the end of forward. Copied back early it would sit on the GPU through the loss and
        the first kept blocks' backward, where the step's memory peaks; two blocks of backward are
        several times the copy's time."""
        if self.num_layers is None:
            return
        n_off = self.num_layers - min(self.keep_on_gpu, self.num_layers)
        if idx != n_off + min(self.keep_on_gpu, PREFETCH_LEAD) - 1:
            return
        last = self._last_group() if self._last_group is not None else None
        if last is None:
            return
        if not y.requires_grad:
            last.prefetch()
            return
        ref = weakref.ref(last)

        def hook(grad: torch.Tensor) -> None:
            group = ref()
            if group is not None:
                group.prefetch()

        y.register_hook(hook)

    def _calibrate(self, layer: nn.Module, x: torch.Tensor, idx: int) -> None:
        """save_mlp "auto": CALIBRATION_FORWARDS forwards from the second on time their copies out against
        their blocks' compute (CUDA events, every block recomputing gate/up); once those events are done,
        the shortest of them picks how many offloaded blocks also send gate/up out: as many as the copy
        time it leaves unused can carry (90% of it). Each one saves a [tokens, hidden] x [hidden, 2 x
        intermediate] GEMM in backward; past that the copies out fall behind and hold GPU memory. One
        timed forward ran 117-159 ms on different H200s, and its pick 4-15 blocks: the shortest of three
        is the steadier (and the safer: fewer blocks)."""
        if idx != 0 or self.num_layers is None:
            return
        self._forwards += 1
        cal = self._cal
        if cal is None and self._forwards < 2:  # the first forward allocates the pinned buffers: not timed
            return
        if cal is not None and cal.end is None:  # the timed forward never finished (it raised): time this one
            cal = self._cal = None
        if cal is not None:
            if not all(e.query() for e in cal.all_events()):
                return  # the GPU is still behind: look again at the next forward
            self._timed.append(cal.result())
            cal = self._cal = None
        if len(self._timed) >= CALIBRATION_FORWARDS:
            self._decide()
            return
        inter = getattr(getattr(getattr(layer, "mlp", None), "gate_proj", None), "out_features", None)
        if not inter or getattr(layer.mlp, "recompute", None) is None:
            self.auto = False  # no fused MLP with a gate/up switch: nothing to choose
            return
        self._gate_up_bytes = 2 * (x.numel() // x.shape[-1]) * inter * x.element_size()
        self._cal = cal = _Calibration()
        if x.is_cuda:
            # the GPU idles first (~0.1 s) while the host queues the timed forward ahead of it: on a host
            # slower than the GPU the blocks' events otherwise time the host, and a forward of ~112 ms of
            # GPU work read 198 ms and let 25 blocks keep gate/up (benchmarks/RESULTS.md, 14th session)
            torch.cuda._sleep(CALIBRATION_SLEEP_CYCLES)
        cal.start = cal.event(torch.cuda.current_stream(x.device))

    def _decide(self) -> None:
        self.auto = False
        forward_ms, copy_ms, copied, _ = min(self._timed)
        n_off = self.num_layers - min(self.keep_on_gpu, self.num_layers)
        n = gate_up_blocks_that_fit(forward_ms, copy_ms, copied, self._gate_up_bytes, n_off)
        n = min(n, max(0, _host_free() // 2 - self.pool.total_bytes) // self._gate_up_bytes)  # host memory too
        self.save_mlp = frozenset(save_mlp_layers(self.num_layers, self.keep_on_gpu, self.save_kept, n))
        self.auto_report = {"forward_ms": round(forward_ms, 1), "forwards_ms": [round(t[0], 1) for t in self._timed],
                            "spans_ms": [round(t[3], 1) for t in self._timed],
                            "copied_gb": round(copied / 1e9, 2),
                            "copy_gbps": round(copied / copy_ms / 1e6, 1) if copy_ms else None,
                            "save_mlp_blocks": n}

    def _lend_to(self, layer: nn.Module, x: torch.Tensor, idx: int) -> WeightLend | None:
        """offload_weights_mode "lend": the WeightLend, begun for block idx, when the block's gate/up fit in
        the lent weights' memory now (its fused MLP then keeps them there instead of recomputing them)."""
        ws = self.weights
        if not isinstance(ws, WeightLend):
            return None
        inter = getattr(getattr(getattr(layer, "mlp", None), "gate_proj", None), "out_features", None)
        if not inter or getattr(layer.mlp, "recompute", None) is None:
            return None
        rows = x.numel() // x.shape[-1]
        if not ws.can_take(idx, 2 * rows * inter * x.element_size()):
            return None
        ws.begin(idx, rows, inter)
        return ws

    def _activations(self, layer, x, rope, cu_seqlens, max_seqlen, first: bool, idx: int,
                     lend: WeightLend | None = None) -> torch.Tensor:
        key = id(layer)
        # frozen 16-bit weights are saved by the matmuls: never copy them. A block whose quantized weights
        # move (offload_weights_mode gap) gets their addresses from the mover at each forward: their old
        # ones go to activations once they leave, and those must be copied
        ws = self.weights
        moving = isinstance(ws, WeightGap) and idx in ws.blocks
        if key not in self._param_ptrs:
            ptrs = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
            if moving:
                ptrs -= {getattr(m, n).untyped_storage().data_ptr() for m, n in quantized_buffers(layer)}
            self._param_ptrs[key] = ptrs
        frozen = self._param_ptrs[key] | ws.device_ptrs(idx) if moving else self._param_ptrs[key]
        shared = {t.untyped_storage().data_ptr() for t in _tensors((rope, cu_seqlens))}
        group = _ActGroup(self, frozen | shared, self.simulate)
        group.idx = idx
        group.prev = None if first else self._last_group
        # the fused MLP recomputes gate/up in backward instead of saving them (unless idx is in save_mlp):
        # offloading them would move 2 x intermediate/hidden (7x for Llama-8B) more bytes per block
        pack = group.pack if lend is None else functools.partial(_lend_first, lend, group.pack)
        with _MLPRecompute(layer, idx not in self.save_mlp and lend is None), \
                torch.autograd.graph.saved_tensors_hooks(pack, _ActGroup.unpack):
            y = layer(x, rope, cu_seqlens, max_seqlen)
        group.close()
        self._last_group = weakref.ref(group)
        return y

    @property
    def host_bytes(self) -> int:
        return self.pool.total_bytes


def gate_up_blocks_that_fit(forward_ms: float, copy_ms: float, copied: int, gate_up_bytes: int, n_off: int,
                            use: float = 0.9) -> int:
    """How many offloaded blocks can add their gate/up (gate_up_bytes each) to the copies out of a forward
    that took forward_ms of GPU time and copied `copied` bytes in copy_ms: the copy engine's rate times
    `use` of the forward, less what it already carries."""
    if copy_ms <= 0 or copied <= 0 or gate_up_bytes <= 0:
        return 0
    spare = use * forward_ms * copied / copy_ms - copied
    return max(0, min(n_off, int(spare // gate_up_bytes)))


class _Calibration:
    """CUDA events of one forward for save_mlp "auto" (OffloadCheckpoint._calibrate)."""

    def __init__(self):
        self.start = self.end = None
        self.blocks: list = []  # an event at the start of each block after the first (compute stream)
        self.copies: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.bytes = 0

    def result(self) -> tuple[float, float, int, float]:
        """(forward ms, copy ms, bytes copied out, span ms) once every event is done. The forward is the median
        block's time x the blocks, when that is shorter than the whole span: the span also counts the
        GPU waiting on the host (a slow launch, the allocator, a collector pause) within a few blocks,
        which once read 120-200 ms where the blocks ran ~105 and let too many blocks keep gate/up."""
        span = self.start.elapsed_time(self.end)
        marks = [self.start, *self.blocks, self.end]
        blocks = sorted(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))
        forward = min(span, blocks[len(blocks) // 2] * len(blocks)) if len(blocks) > 2 else span
        return (forward, sum(a.elapsed_time(b) for a, b in self.copies), self.bytes, span)

    @staticmethod
    def event(stream) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record(stream)
        return e

    def all_events(self) -> list:
        return [self.start, *self.blocks, self.end, *(e for pair in self.copies for e in pair)]


class _MLPRecompute:
    """Sets a block's fused-MLP gate/up recompute switch for one forward, then puts it back."""

    __slots__ = ("mlp", "old", "new")

    def __init__(self, layer: nn.Module, recompute: bool):
        self.mlp = getattr(layer, "mlp", None)
        self.old = getattr(self.mlp, "recompute", None)
        self.new = recompute

    def __enter__(self):
        if self.old is not None:
            self.mlp.recompute = self.new

    def __exit__(self, *exc):
        if self.old is not None:
            self.mlp.recompute = self.old


def _lend_first(lend: WeightLend, pack: Callable, t: torch.Tensor):
    """An offloaded block that keeps gate/up in lent weight memory: those go there, the rest to pack."""
    v = lend.take(t)
    return v if v is not None else pack(t)


def _same(t):
    return t


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _host_free() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


# ------------------------------------------------------------------------------- entry point
def _layers(model: nn.Module) -> list[nn.Module]:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    return list(layers) if layers is not None else []


DEFAULT_MLP_CHUNK = 8192


def save_mlp_layers(num_layers: int, keep_on_gpu: int, kept: int = 0, offloaded: int = 0) -> list[int]:
    """Blocks whose fused MLP keeps gate/up (strategy "activations"): the last `kept` of the last
    `keep_on_gpu` blocks (GPU memory, no PCIe; the very last block's cost nothing at the backward peak,
    where its MLP backward would hold the recomputed ones anyway) and `offloaded` of the others, spread
    evenly and ending at the last one, so the extra copies out never pile up behind one stretch of the
    forward (each such block adds ~2 x intermediate/hidden units of PCIe traffic against one block's
    compute)."""
    keep = min(max(keep_on_gpu, 0), num_layers)
    n_off = num_layers - keep
    kept_ids = list(range(num_layers - min(max(kept, 0), keep), num_layers))
    off = min(max(offloaded, 0), n_off)
    off_ids = sorted({n_off - 1 - (j * n_off) // off for j in range(off)}) if off else []
    return off_ids + kept_ids


def apply_checkpointing(model: nn.Module, mode: bool | str | None, *, mlp_chunk: int | str | None = "auto",
                        keep_on_gpu: int = 0, offload: str = "inputs",
                        save_mlp: Iterable[int] | int | str = (), save_mlp_kept: int = 0,
                        stream_weights: int = 0, weights_mode: str = "stream") -> Callable | None:
    """Set gradient checkpointing for `model` (Tunery's decoder, or the transformers fallback).

    mode: False/None (off), True (recompute per block), "offload" (recompute, block inputs in CPU
    memory). `mlp_chunk` (tokens): MLPs of rows longer than this run in chunks (exact; only rows
    longer than the chunk are affected); "auto" = 8192 when checkpointing is on, else off.
    `keep_on_gpu` keeps the inputs of the last N blocks on the GPU (offload mode; the memory planner's
    `best_keep_on_gpu` says how many fit). `offload` picks what goes to host memory in offload mode:
    "inputs" (block inputs, recompute; the default), "activations" (everything a block saves, no
    recompute) or "auto" (see OffloadCheckpoint). `save_mlp`: with "activations", the blocks (indices)
    whose fused MLP keeps gate/up instead of recomputing them in backward (2 x intermediate/hidden units
    each, on the GPU for a kept block, through host memory otherwise), a count of offloaded blocks
    (`save_mlp_layers` spreads them), or "auto": as many offloaded blocks as the copy time left over in
    the shortest of three timed forwards carries (CUDA). `save_mlp_kept`: the last N of the kept blocks keep gate/up too
    (GPU memory; the planner's `best_save_kept` says how many fit). `stream_weights` (offload mode): the
    first N offloaded blocks keep their frozen 4-bit weights in host memory and copy them in for their
    forward and backward (`weights_mode` "stream"), or the first N blocks' leave the GPU after their
    forward and come back during the backward ("gap"), or the first N blocks' stay put and lend their
    memory between forward and backward to later blocks' gate/up ("lend", strategy "activations";
    train/weight_stream.py).
    Returns the installed checkpoint function (an OffloadCheckpoint for "offload").
    """
    if mode not in (None, False, True, "offload"):
        raise ValueError(f"gradient_checkpointing must be true, false or offload, got {mode!r}")
    if mlp_chunk == "auto":
        mlp_chunk = DEFAULT_MLP_CHUNK if mode else None
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "checkpoint_fn"):
        hf = getattr(model, "hf", None)
        if hf is None:
            raise ValueError(f"{type(model).__name__} has no checkpointing hook (model.model.checkpoint_fn)")
        if mode:  # transformers fallback: its own non-reentrant checkpointing; offload is not available there
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_disable()
        return None
    if stream_weights and mode != "offload":
        raise ValueError("streaming weights from host memory needs gradient_checkpointing: offload")
    if weights_mode not in ("stream", "gap", "lend"):
        raise ValueError(f"offload_weights_mode must be stream, gap or lend, got {weights_mode!r}")
    old = getattr(body, "checkpoint_fn", None)
    if isinstance(old, OffloadCheckpoint):  # hooks off, weights back on the GPU before a new setup
        old.stop_streaming()
    set_mlp_chunking(model, mlp_chunk)
    if not mode:
        body.checkpoint_fn = None
    elif mode == "offload":
        if isinstance(save_mlp, int):  # a count of offloaded blocks -> their indices
            save_mlp = save_mlp_layers(len(body.layers), keep_on_gpu, 0, save_mlp)
        off = OffloadCheckpoint(keep_on_gpu, len(body.layers), strategy=offload, save_mlp=save_mlp,
                                save_kept=save_mlp_kept)
        off.layer_index = {id(layer): i for i, layer in enumerate(body.layers)}
        if stream_weights and weights_mode == "lend":
            n = len(body.layers)
            off.weights = WeightLend({i: body.layers[i] for i in range(min(stream_weights, n))})
            off.weights._take_all()  # the arena now: the first step's peak too
        elif stream_weights and weights_mode == "gap":
            n = len(body.layers)
            off.weights = WeightGap({i: body.layers[i] for i in range(min(stream_weights, n))}, n, keep_on_gpu)
            off.weights._take_all()  # host copies now: a block's weights can leave at its first forward
        elif stream_weights:
            streamed = first_blocks(len(body.layers), keep_on_gpu, stream_weights)
            off.weights = WeightStream({i: body.layers[i] for i in streamed}, h2d_stream=lambda: off.h2d_stream)
            off.weights._take_all()  # off the GPU now, not at the first forward: the first step's peak too
        body.checkpoint_fn = off
    else:
        body.checkpoint_fn = _plain_checkpoint
    return body.checkpoint_fn


def _plain_checkpoint(layer, x, rope, cu_seqlens, max_seqlen):
    if not torch.is_grad_enabled():
        return layer(x, rope, cu_seqlens, max_seqlen)
    return checkpoint(layer, x, rope, cu_seqlens, max_seqlen, use_reentrant=False)


__all__ = ["OffloadCheckpoint", "apply_checkpointing", "chunked_mlp", "gate_up_blocks_that_fit", "save_mlp_layers",
           "set_mlp_chunking"]
