"""A frozen input embedding kept in CPU memory: only the looked-up rows travel to the GPU.

For an 8B Llama the embedding table is 1 GiB in bf16 and only a few thousand rows are read per
step, so keeping it on the host frees that GiB at no cost in quality (unlike quantizing it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        buf = self.__dict__.get("_pinned")
        if buf is None or buf.numel() < n * d or buf.dtype != self.weight.dtype:
            buf = self.__dict__["_pinned"] = torch.empty(n * d, dtype=self.weight.dtype, pin_memory=True)
        elif self.__dict__.get("_sent") is not None:
            self.__dict__["_sent"].synchronize()  # the last copy out of the buffer is done (long since)
        rows = buf[: n * d].view(n, d)
        torch.index_select(self.weight, 0, ids, out=rows)
        out = rows.to(dev, non_blocking=True)
        sent = torch.cuda.Event()
        sent.record()
        self.__dict__["_sent"] = sent
        return out.view(*input_ids.shape, d)

    def _apply(self, fn, recurse=True):
        _, dtype = probe_apply(fn, self.weight.device)
        if dtype is not None and self.weight.dtype != dtype:
            self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on cpu"


def with_host_copy(device_ids: torch.Tensor, host_ids: torch.Tensor) -> torch.Tensor:
    """Remember that `host_ids` (CPU) holds the values of `device_ids`: a CPU-held embedding then
    reads the ids from there instead of copying them back from the GPU. Returns `device_ids`."""
    device_ids._tunery_host = (host_ids, device_ids._version, device_ids.shape)
    return device_ids


def host_copy(t: torch.Tensor) -> torch.Tensor | None:
    """The host copy set by with_host_copy, if `t` has not changed since (same version and shape)."""
    rec = getattr(t, "_tunery_host", None)
    if rec is None or rec[1] != t._version or rec[2] != t.shape:
        return None
    return rec[0]


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
