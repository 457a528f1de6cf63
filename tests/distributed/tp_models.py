"""The tiny checkpoints' shapes for the tensor-parallel tests (shared by conftest and the tests)."""

from __future__ import annotations

# vocab 251 does not split evenly over 2 ranks (exercises the padded vocabulary); 4 query heads and
# 1 or 2 KV heads (1: the KV head is replicated on both ranks)
_COMMON = dict(vocab_size=251, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
ARCHS = {
    "LlamaForCausalLM": ("LlamaConfig", dict(num_key_value_heads=1)),
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=32)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                               tie_word_embeddings=True)),
    "Phi3ForCausalLM": ("Phi3Config", dict(partial_rotary_factor=0.5)),
}
# Gemma 3 and the mixture-of-experts models (tests/distributed/test_tp_gemma3_moe.py): (HF config, overrides)
NEW_ARCHS = {
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                                   num_hidden_layers=3, sliding_window_pattern=2,
                                                   rope_local_base_freq=100.0, rope_theta=50000.0,
                                                   final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   head_dim=16, norm_topk_prob=False, mlp_only_layers=[1])),
}
# the build's quality check feeds tokenizer text, so the quantized-engine test needs the tokenizer's vocabulary
QUANT = ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32, vocab_size=49152))
