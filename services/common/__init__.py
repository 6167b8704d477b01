"""The serving layer shared by the codec, LM and gateway services.

- `server`: grpc.aio bootstrap (health, reflection, limits, TLS, auth, drain, RPC metrics)
- `backend`: start a backend whose model loads after the port opened (NOT_SERVING meanwhile)
- `metrics`: every Prometheus metric of the project (per-server registries)
- `errors`: domain exceptions -> gRPC status codes, in one place
- `batching`: slot-based cross-session batching scheduler (one runner thread per replica)
- `request_streams`: request-stream helpers (idle timeout, open-then-frames protocol, slot release)
- `wire`: PCM / codes wire formats and their validation
- `flags`: shared CLI flags and `--hf-repo` download
- `logs`: session id and RPC name in every log record
- `tracing`: optional OpenTelemetry spans per session and backend stream (`--otel-endpoint`)
"""
