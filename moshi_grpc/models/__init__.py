"""The models, torch only (no gRPC, no metrics): a test keeps this layer free of serving code.

- `mimi`: the Mimi codec (the network, offline encode/decode); `mimi_streaming`: its rows
  of streaming state (one frame per row per call, per-row reset and move).
- `lm`: the Moshi LM (temporal transformer + depformer, one step or a prefill chunk over
  rows of a ring KV cache); `lm_gen`: the batched row generator and sampling; `text`:
  SentencePiece text pieces.
- `streaming`, `rope`, `checkpoint`: per-row ring KV cache and its masks, rotary embeddings,
  strict safetensors loading; shared by both models. `mimi_hf`: Hugging Face names of Mimi.
- `validation`: input and configuration checks of both models' public calls.
- `cpu_fast`: faster CPU forms of both models' device seams, applied from above by the
  engines and benchmarks (the model files never import it).
"""
