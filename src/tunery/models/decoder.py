"""Tunery's own decoder for the families it accelerates (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3).

It returns hidden states (the loss owns the LM head), keeps the HF parameter names so checkpoints
load directly, and takes `position_ids` that restart inside a row so packed documents stay apart.
Small switches cover the family differences instead of one class per family.

On CUDA tensors a block takes the fused path by itself: RMSNorm folded into the q/k/v and MLP
projections, fused LoRA (when the adapter has no dropout), Triton RoPE / activations / norms and
varlen FlashAttention. `set_fused(model, False)` (config `kernels: false`) gives the plain path;
`set_mlp_recompute` trades MLP activations for a recomputation in backward; `compile_blocks`
compiles each block (config `torch_compile: true`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import use_triton_for
from ..kernels.activations import gated_act
from ..kernels.attention import varlen_attention
from ..kernels.lora import LinearSpec, fused_linears, fused_mlp, lora_linear
from ..kernels.rmsnorm import rms_norm
from ..kernels.rope import apply_rope, rope_cos_sin, rope_inv_freq


@dataclass
class DecoderConfig:
    """The switches that tell the supported families apart, read from an HF config."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0          # Gemma stores weight-1
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    hidden_act: str = "silu"          # silu | gelu_tanh | gelu
    sandwich_norm: bool = False       # Gemma 2/3: extra norms after attention and MLP
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None  # attention scale override (Gemma's query_pre_attn_scalar ** -0.5)
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: full_attention | sliding_attention
    local_rope: dict[str, Any] | None = None  # Gemma 3 local layers use another rope base
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def window_for(self, layer: int) -> int | None:
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, fused=None if self.fused else False)


def linear_spec(m: nn.Module) -> LinearSpec | None:
    """What the fused kernels need from a projection: an nn.Linear, or a LoRA layer (duck-typed on
    adapters/lora.py's LoRALinear: base_weight(), lora_A, lora_B, scale, dropout_p, enabled).
    None means "not fusable here" (active dropout, DoRA, an unknown module): the caller falls back."""
    if type(m) is nn.Linear:
        return LinearSpec(m.weight, m.bias)
    if getattr(m, "is_quantized_linear", False) and hasattr(m.weight, "dequantize"):  # quant.NF4Linear
        return LinearSpec(None, m.bias, weight_fn=m.weight.dequantize, quant=m.weight)
    if not (hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "base_weight")):
        return None
    if getattr(m, "use_dora", False) or getattr(m, "magnitude", None) is not None:
        return None
    enabled = getattr(m, "enabled", True)
    if enabled and m.dropout_p and m.training:
        return None
    mw = m.weight
    w = mw if isinstance(mw, torch.Tensor) else None
    fn = None if w is not None else m.base_weight
    quant = mw if w is None and hasattr(mw, "dequantize") else None
    if not enabled:
        return LinearSpec(w, m.bias, weight_fn=fn, quant=quant)
    return LinearSpec(w, m.bias, m.lora_A, m.lora_B, float(m.scale), fn, quant)


class KVCache:
    """Static per-layer key/value buffers for batched generation (left-padded prompts).

    `key_mask[b, j]` says slot j of row b holds a real (non-pad) key; the caller sets it. With
    `static=True` the write position is the tensor `pos` instead of the int `length`, and attention
    runs over the whole buffer under the mask: every decode step has the same shapes, so it can be
    captured in a CUDA graph or compiled once (the caller advances `pos`).
    """

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, device, dtype, static: bool = False):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0
        self.max_len = max_len
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # valid (non-pad) keys
        self.pos = torch.zeros(1, dtype=torch.long, device=device) if static else None
        self.masks: dict = {}  # this forward's attention masks by window size, built by the first layer

    def reorder(self, index: torch.Tensor) -> None:
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]
        self.key_mask = self.key_mask[index]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        self.scale = cfg.query_scale if cfg.query_scale is not None else 1.0 / math.sqrt(d)
        self.window = cfg.window_for(layer)
        self.attn_backend = "auto"
        self.fused = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None,
                max_seqlen: int, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, d)
        k = self.k_proj(x).view(b, t, -1, d)
        v = self.v_proj(x).view(b, t, -1, d)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin, fused=None if self.fused else False)
        if cache is None:
            o = varlen_attention(q.reshape(b * t, -1, d), k.reshape(b * t, -1, d), v.reshape(b * t, -1, d),
                                 cu_seqlens, max_seqlen, self.scale, self.window, self.cfg.attn_softcap,
                                 backend=self.attn_backend)
            o = o.view(b, t, -1)
        else:
            o = self._cached(q, k, v, cache).reshape(b, t, -1)
        return self.o_proj(o)

    def forward_fused(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """norm -> q/k/v (one fused Function) -> qk-norm -> RoPE -> varlen attention -> o_proj."""
        b, t, _ = x.shape
        d = self.cfg.head_dim
        specs = [linear_spec(p) for p in (self.q_proj, self.k_proj, self.v_proj)]
        if any(s is None for s in specs):
            h = norm(x)
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        else:
            q, k, v = fused_linears(x, specs, norm.weight, norm.eps, norm.offset)
        q, k, v = q.view(b, t, -1, d), k.view(b, t, -1, d), v.view(b, t, -1, d)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)
        o = varlen_attention(q.reshape(b * t, -1, d), k.reshape(b * t, -1, d), v.reshape(b * t, -1, d),
                             cu_seqlens, max_seqlen, self.scale, self.window, self.cfg.attn_softcap,
                             backend=self.attn_backend)
        o = o.reshape(b, t, -1)
        so = linear_spec(self.o_proj)
        if so is not None and so.lora_a is not None:
            return lora_linear(o, so)
        return self.o_proj(o)

    def _cached(self, q, k, v, cache: KVCache) -> torch.Tensor:
        """Write this step's keys into the cache and attend over every valid key so far."""
        b, t = q.shape[:2]
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        if cache.pos is not None:  # fixed shapes: write at a tensor position, attend over the whole buffer
            qi = cache.pos + torch.arange(t, device=q.device)
            kc.index_copy_(2, qi, k.transpose(1, 2).to(kc.dtype))
            vc.index_copy_(2, qi, v.transpose(1, 2).to(vc.dtype))
            kk, vv, valid = kc, vc, cache.key_mask
        else:
            s = cache.length
            kc[:, :, s : s + t] = k.transpose(1, 2)
            vc[:, :, s : s + t] = v.transpose(1, 2)
            kk, vv, valid = kc[:, :, : s + t], vc[:, :, : s + t], cache.key_mask[:, : s + t]
            qi = torch.arange(s, s + t, device=q.device)
        if self.layer == 0:
            cache.masks = {}
        mask = cache.masks.get(self.window)
        if mask is None:  # one mask per forward and window size, shared by the layers
            ki = torch.arange(kk.shape[2], device=q.device)
            causal = ki[None, :] <= qi[:, None]
            if self.window is not None:
                causal = causal & (qi[:, None] - ki[None, :] < self.window)
            # a query always sees its own key, so a left-pad row is never fully masked (that would give NaN)
            mask = (causal[None, None] & valid[:, None, None, :]) | (ki[None, :] == qi[:, None])[None, None]
            cache.masks[self.window] = mask
        qq = q.transpose(1, 2)
        hkv = kk.shape[1]
        rep = qq.shape[1] // hkv
        if rep > 1 and t == 1:  # decode: a group's query heads become query rows, the cache is not copied
            qq = qq.reshape(b, hkv, rep, qq.shape[-1])
        elif rep > 1:
            kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        if self.cfg.attn_softcap is None:
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale)
        else:
            sc = (qq.float() @ kk.float().transpose(-1, -2)) * self.scale
            sc = torch.tanh(sc / self.cfg.attn_softcap) * self.cfg.attn_softcap
            o = (sc.masked_fill(~mask, float("-inf")).softmax(-1) @ vv.float()).to(q.dtype)
        return o.reshape(b, -1, t, o.shape[-1]).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = cfg.hidden_act
        self.fused = True
        self.recompute = False  # fused path: recompute gate/up in backward instead of keeping them
        self.chunk_fn = None  # train/activations.py: chunk_fn(dense, x) runs dense over token chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_fn is not None:
            return self.chunk_fn(self._dense, x)
        return self._dense(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and use_triton_for(x):
            specs = [linear_spec(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
            if all(s is not None for s in specs):
                return fused_mlp(x, *specs, kind=self.act, recompute=self.recompute)
        return self.down_proj(gated_act(self.gate_proj(x), self.up_proj(x), self.act,
                                        fused=None if self.fused else False))

    def forward_fused(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm folded into the fused MLP (its input is recomputed in backward, never kept)."""
        specs = [linear_spec(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if self.chunk_fn is not None or any(s is None for s in specs):
            return self(norm(x))
        return fused_mlp(x, *specs, kind=self.act, norm_weight=norm.weight, eps=norm.eps, offset=norm.offset,
                         recompute=self.recompute)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.local = cfg.local_rope is not None and cfg.window_for(layer) is not None
        self.fused = True

    def forward(self, x, rope, cu_seqlens, max_seqlen, cache=None):
        if cache is None and self.fused and use_triton_for(x):
            return self._forward_fused(x, rope, cu_seqlens, max_seqlen)
        cos, sin = rope[1] if self.local else rope[0]
        a = self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_fused(self, x, rope, cu_seqlens, max_seqlen):
        cos, sin = rope[1] if self.local else rope[0]
        a = self.self_attn.forward_fused(x, self.input_layernorm, cos, sin, cu_seqlens, max_seqlen)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp.forward_fused(x, self.pre_feedforward_layernorm))
        x = x + a
        return x + self.mlp.forward_fused(x, self.post_attention_layernorm)


class DecoderBody(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        inv, scale = rope_inv_freq(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.rope_scale = scale
        if cfg.local_rope is not None:
            inv_l, scale_l = rope_inv_freq(cfg.head_dim, cfg.local_rope, cfg.max_position_embeddings)
            self.register_buffer("inv_freq_local", inv_l, persistent=False)
            self.rope_scale_local = scale_l
        self.checkpoint_fn = None  # set by train/activations.py for gradient checkpointing

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() / to_empty would round or wipe the rope frequencies: keep them exact fp32.
        super()._apply(fn, recurse)
        cfg = self.cfg
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)[0].to(self.inv_freq.device)
        if cfg.local_rope is not None:
            self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.local_rope,
                                                cfg.max_position_embeddings)[0].to(self.inv_freq_local.device)
        return self


def doc_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) of the flattened [B, T] stream: a document starts at position 0 or a row start."""
    b, t = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    idx = starts.reshape(-1).nonzero().squeeze(-1)
    cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu, max_len


class CausalLM(nn.Module):
    """Decoder + LM head. `forward` returns hidden states; `logits` applies the head when needed."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.cfg.embed_scale is not None:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        return x

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        m = self.model
        glob = rope_cos_sin(position_ids, m.inv_freq, m.rope_scale, dtype)
        loc = rope_cos_sin(position_ids, m.inv_freq_local, m.rope_scale_local, dtype) if self.cfg.local_rope else None
        return glob, loc

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cache: KVCache | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, H] (after the last norm). `embeds`: the ids'
        embedding made beforehand (a CUDA-graph step looks up the CPU-held table outside the graph)."""
        b, t = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        if cache is None and cu_seqlens is None:
            cu_seqlens, max_seqlen = doc_boundaries(position_ids)
        x = self.embed(input_ids) if embeds is None else embeds
        rope = self.rope(position_ids, x.dtype)
        ckpt = self.model.checkpoint_fn if (self.training and cache is None) else None
        for layer in self.model.layers:
            if ckpt is not None:
                x = ckpt(layer, x, rope, cu_seqlens, max_seqlen)
            else:
                x = layer(x, rope, cu_seqlens, max_seqlen, cache)
        if cache is not None:
            cache.length += t
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden, self.lm_head.weight).float()
        if self.cfg.final_softcap is not None:
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out


def _blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def set_fused(model: nn.Module, enabled: bool) -> None:
    """Turn the fused kernels of the own decoder on (default: used for CUDA tensors) or off (config
    `kernels: false`). A transformers-fallback model has no fused path: nothing to do."""
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, MLP, Block)):
            m.fused = bool(enabled)
        if isinstance(m, Attention):
            m.attn_backend = "auto" if enabled else "sdpa"


def set_mlp_recompute(model: nn.Module, layers: int | bool | None) -> None:
    """Selective activation checkpointing for the fused path: the first `layers` blocks (True: all)
    keep no gate/up activations ([tokens, intermediate] each) and recompute them in backward."""
    blocks = _blocks(model)
    n = len(blocks) if layers is True else int(layers or 0)
    for i, b in enumerate(blocks):
        b.mlp.recompute = i < n


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """torch.compile each decoder block in place (names and state dict unchanged). Returns the count.

    The fused Triton/LoRA/flash functions are compiler-disabled, so they run as they are between the
    compiled pieces; with `set_fused(model, False)` Inductor fuses the plain ops itself.
    """
    blocks = _blocks(model)
    for b in blocks:
        b.compile(**compile_kwargs)
    return len(blocks)
