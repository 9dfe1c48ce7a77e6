"""The paper's model shapes (from the published config.json files), for benchmarks and memory plans
without downloading weights: the cost of a forward does not depend on the weights' values."""
from __future__ import annotations

SHAPES = {
    # Qwen/Qwen2.5-Math-1.5B-Instruct (and the Skywork-o1-Open-PRM-Qwen-2.5-1.5B backbone)
    "qwen2.5-math-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True),
    # Qwen/Qwen2.5-Math-7B-Instruct
    "qwen2.5-math-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
    # Qwen/Qwen2.5-Math-72B-Instruct
    "qwen2.5-math-72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                             max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
}


def qwen2_config(name: str, scale: int = 1, min_head_dim: int = 8, **overrides):
    """A Qwen2Config of a named shape; `scale` > 1 divides widths and depth (CPU smoke tests), keeping
    heads at least `min_head_dim` wide (vLLM's CPU attention needs 32)."""
    from transformers import Qwen2Config

    s = dict(SHAPES[name])
    if scale > 1:
        heads = max(2, s["num_attention_heads"] // scale)
        kv = max(1, min(heads, s["num_key_value_heads"]))
        while heads % kv:
            kv -= 1
        s.update(num_attention_heads=heads, num_key_value_heads=kv,
                 hidden_size=heads * max(min_head_dim, (s["hidden_size"] // s["num_attention_heads"]) // scale),
                 intermediate_size=max(32, s["intermediate_size"] // scale ** 2),
                 num_hidden_layers=max(1, s["num_hidden_layers"] // scale))
    s.update(overrides)
    return Qwen2Config(**s)
