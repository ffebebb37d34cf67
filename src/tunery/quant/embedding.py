"""A frozen input embedding kept in CPU memory: only the looked-up rows travel to the GPU.

For an 8B Llama the embedding table is 1 GiB in bf16 and only a few thousand rows are read per
step, so keeping it on the host frees that GiB at no cost in quality (unlike quantizing it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import host_copy
from .nf4 import probe_apply


class CPUEmbedding(nn.Module):
    """Same parameter name (`weight`) as nn.Embedding, so checkpoints and state_dict keys do not change.

    `.to(device)` on the model leaves the table on the CPU (a float cast still applies).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = nn.Parameter(weight.detach().to("cpu"), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dev = input_ids.device
        if dev.type != "cuda":
            return F.embedding(input_ids.to("cpu"), self.weight).to(dev)
        # rows gathered into a reused page-locked buffer and sent asynchronously: a pageable copy of
        # an 8B model's 4096 rows (32 MiB) blocked the step's start for ~3.5 ms on an H200. The ids'
        # host copy, when the caller kept one (with_host_copy), spares a device-to-host sync that
        # would wait for all queued GPU work (the previous step's backward) before this step can start.
        host = host_copy(input_ids)
        ids = (host if host is not None else input_ids.to("cpu")).reshape(-1)
        n, d = ids.numel(), self.embedding_dim
        # two buffers in turn: with no sync per step the CPU queues a step ahead of the GPU, and a
        # buffer is refilled only once the copy out of it two calls ago is done (long since)
        ring = self.__dict__.setdefault("_ring", [[None, None], [None, None]])  # [buffer, copy event]
        turn = self.__dict__["_turn"] = 1 - self.__dict__.get("_turn", 1)
        buf, sent = ring[turn]
        if buf is None or buf.numel() < n * d or buf.dtype != self.weight.dtype:
            buf = ring[turn][0] = torch.empty(n * d, dtype=self.weight.dtype, pin_memory=True)
        elif sent is not None:
            sent.synchronize()
        rows = buf[: n * d].view(n, d)
        torch.index_select(self.weight, 0, ids, out=rows)
        out = rows.to(dev, non_blocking=True)
        sent = ring[turn][1] = torch.cuda.Event()
        sent.record()
        return out.view(*input_ids.shape, d)

    def _apply(self, fn, recurse=True):
        _, dtype = probe_apply(fn, self.weight.device)
        if dtype is not None and self.weight.dtype != dtype:
            self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on cpu"


def offload_embedding(model: nn.Module, name: str = "model.embed_tokens") -> bool:
    """Move a frozen, untied input embedding to the CPU. Returns False (and does nothing) when the
    table is trained or shared with the LM head (tied embeddings), which need it on the GPU."""
    emb = model.get_submodule(name)
    if isinstance(emb, CPUEmbedding):
        return True
    w = emb.weight
    if w.requires_grad:
        return False
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is w:
        return False
    parent, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, CPUEmbedding(w))
    return True
