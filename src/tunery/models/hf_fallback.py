"""Any other causal LM trains through transformers, unfused, behind the same hidden-states interface."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class HFCausalLM(nn.Module):
    """Wraps a transformers causal LM: forward returns hidden states; documents of a flat row are
    split into a padded batch so they never attend to each other."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.cfg = None

    @property
    def head_weight(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, cache=None):
        if cache is not None:
            raise NotImplementedError("KV-cache generation for transformers-fallback models uses transformers' generate")
        from .decoder import doc_boundaries

        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        if cu_seqlens is None:
            cu_seqlens, _ = doc_boundaries(position_ids)
        flat = input_ids.reshape(-1)
        bounds = cu_seqlens.tolist()
        lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        longest = max(lens)
        ids = flat.new_zeros(len(lens), longest)
        mask = torch.zeros(len(lens), longest, dtype=torch.long, device=flat.device)
        for i, (s, n) in enumerate(zip(bounds[:-1], lens)):
            ids[i, :n] = flat[s : s + n]
            mask[i, :n] = 1
        base = self.hf.get_decoder() if hasattr(self.hf, "get_decoder") else self.hf.base_model
        h = base(input_ids=ids, attention_mask=mask).last_hidden_state
        out = torch.cat([h[i, :n] for i, n in enumerate(lens)], 0)
        return out.view(b, t, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight).float()
