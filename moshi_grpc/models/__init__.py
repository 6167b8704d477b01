"""The models, torch only (no gRPC, no metrics): a test keeps this layer free of serving code.

- `mimi`: the Mimi codec (offline encode/decode, batched streaming with per-slot state).
- `lm`: the Moshi LM (temporal transformer + depformer, one step over rows of a ring KV
  cache); `lm_gen`: the batched slot generator and sampling; `text`: SentencePiece text pieces.
- `streaming`, `rope`, `checkpoint`: per-row ring KV cache and its masks, rotary embeddings,
  strict safetensors loading; shared by both models.
- `cpu_fast`: faster CPU forms of both models' layers, applied from above by the engines and
  benchmarks (the model files never import it).
"""
