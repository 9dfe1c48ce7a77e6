"""The cost formulas against a hand count, and the ledger's arithmetic."""
from __future__ import annotations

from transformers import LlamaConfig, Qwen2Config

from rsd_batch.ledger import CostModel, Ledger


def test_non_embedding_params_match_a_hand_count():
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100, tie_word_embeddings=False)
    # Per layer: q 64*64+64, k 64*32+32, v 64*32+32 (Qwen2 has q/k/v biases), o 64*64,
    # MLP gate/up/down 3*64*128, two RMSNorms 2*64. Then the final norm 64 and the lm_head 64*100.
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    hand = 2 * layer + 64 + 64 * 100
    cost = CostModel.from_config(cfg)
    assert cost.non_embedding_params == hand == 80704
    assert (cost.n_layers, cost.d_attn) == (2, 64)
    # A tied lm_head is still a matmul on every token: same count.
    cfg.tie_word_embeddings = True
    assert CostModel.from_config(cfg).non_embedding_params == hand


def test_forward_flops_formula_by_hand():
    cost = CostModel(non_embedding_params=1000, n_layers=3, d_attn=16)
    # One token attending to 5 positions: 2N + 2*L*n_ctx*d.
    assert cost.forward_flops(1, 4) == 2 * 1000 + 2 * 3 * 5 * 16
    # Prefill of 3 tokens after 2 cached ones attends to 3, 4 and 5 positions.
    assert cost.forward_flops(3, 2) == 3 * 2 * 1000 + 2 * 3 * 16 * (3 + 4 + 5)
    # Prefilling P tokens costs exactly what P decode steps would.
    assert cost.forward_flops(7, 10) == sum(cost.forward_flops(1, 10 + i) for i in range(7))
    assert cost.forward_flops(0, 10) == 0


def test_works_for_another_architecture():
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=50, tie_word_embeddings=False)
    layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # no biases in Llama
    assert CostModel.from_config(cfg).non_embedding_params == layer + 32 + 32 * 50


def test_ledger_record_sums_roles():
    cost = CostModel(100, 1, 8)
    led = Ledger()
    led.target.add_prefill(cost, 5, 0)
    led.target.add_decode(cost, 5)
    led.draft.add_prefill(cost, 2, 0)
    rec = led.to_record()
    assert rec["target"]["prefill_tokens"] == 5 and rec["target"]["decode_tokens"] == 1
    assert rec["target"]["flops"] == cost.forward_flops(5, 0) + cost.forward_flops(1, 5)
    assert rec["flops"] == rec["target"]["flops"] + rec["draft"]["flops"] + rec["prm"]["flops"]
