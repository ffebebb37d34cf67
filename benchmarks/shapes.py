"""Public model shapes the benchmarks build with random weights (nothing is downloaded)."""

from __future__ import annotations

GiB = 1 << 30
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_8B = dict(  # Llama-3.1-8B
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
    tie_word_embeddings=False, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
LLAMA_1B = dict(  # Llama-3.2-1B
    LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True,
    rope_scaling=dict(LLAMA_8B["rope_scaling"], factor=32.0),
)
TINY = dict(  # the 8B's structure at toy size, for --smoke runs on CPU
    LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    rope_scaling=dict(LLAMA_8B["rope_scaling"], original_max_position_embeddings=64),
)
