"""The models, torch only (no gRPC, no metrics): a test keeps this layer free of serving code.

- `mimi`: the Mimi codec (offline encode/decode, batched streaming with per-slot state).
- `lm`: the Moshi LM (temporal transformer + depformer, ring KV cache); `lm_gen`: the batched
  slot generator and sampling; `text`: SentencePiece text pieces.
- `rope`, `checkpoint`: rotary embeddings and strict safetensors loading, shared by both.
"""
