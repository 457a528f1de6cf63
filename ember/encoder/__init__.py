"""Encoders: embedding, reranking and classification models (`trt_llm.build.base_model: encoder | encoder_bert`).

models.py picks the class (bert.py: BERT/XLM-RoBERTa; causal.py: Llama-family decoders as embedders),
pooling.py turns hidden states into one vector per input, runner.py runs one batch, engine.py batches
requests by tokens on a background thread. The HTTP routes live in ember/server/serving_encoder.py."""

from ember.encoder.setup import is_encoder_config

__all__ = ["is_encoder_config"]
