"""CLI flags shared by the services, and `--hf-repo` weight download.

Every service calls `add_server_flags` (transport, limits, TLS, auth, lifecycle); the
backends add `add_batching_flags` and `add_model_flags`. `server_config_from_args` turns the
parsed flags into a `ServerConfig`; `resolve_weights` fills the weight paths from
`--hf-repo` where the network allows (huggingface_hub is the optional `[hf]` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from moshi_grpc.services.common.batching import DEFAULT_IDLE_PROBE_S, DEFAULT_MAX_SESSIONS
from moshi_grpc.services.common.server import AUTH_ENV, ServerConfig

log = logging.getLogger(__name__)

# service -> (gRPC port, metrics port)
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "gateway": (50051, 9091),
    "codec": (50052, 9092),
    "lm": (50053, 9093),
}

# File names in kyutai's Hugging Face repositories (config.json may override them).
HF_MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
HF_MOSHI_FILE = "model.safetensors"
HF_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
HF_CONFIG_FILE = "config.json"


class WeightsError(ValueError):
    """Weights could not be found or downloaded; the message says what to do."""


def add_server_flags(parser: argparse.ArgumentParser, service: str) -> None:
    """Transport, limits, TLS, auth and lifecycle flags of every service."""
    port, metrics_port = DEFAULT_PORTS.get(service, (50051, 9090))
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    g.add_argument("--port", type=int, default=port, help="gRPC port (0 = ephemeral)")
    g.add_argument(
        "--metrics-host", default=None, help="address of the /metrics HTTP server (default --host)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="Prometheus /metrics HTTP port (0 = ephemeral, -1 = off)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds live streams may take to finish after SIGTERM (keep it below the "
        "pod's terminationGracePeriodSeconds)",
    )
    g.add_argument(
        "--idle-timeout-s",
        type=float,
        default=30.0,
        help="end a stream with DEADLINE_EXCEEDED when no message came for this long (0 = off)",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest gRPC message accepted or sent (bigger ones get RESOURCE_EXHAUSTED)",
    )
    g.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=0,
        help="gRPC-level cap on concurrent RPCs, health checks included (0 = no cap)",
    )
    g.add_argument(
        "--max-connection-age-s",
        type=float,
        default=0.0,
        help="send GOAWAY after a connection lived this long so clients rebalance (0 = off)",
    )
    g.add_argument(
        "--max-connection-age-grace-s",
        type=float,
        default=None,
        help="time streams get to finish after that GOAWAY (default --grace)",
    )
    g.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca", default=None, help="PEM CA that client certificates must chain to (mTLS)"
    )
    g.add_argument(
        "--auth-token",
        default=None,
        help=f"require `authorization: Bearer <token>` (default: env {AUTH_ENV}; "
        "health checks are exempt)",
    )
    g.add_argument("--json-logs", action="store_true", help="one JSON object per log line")
    add_otel_flag(g)


# The flags below are also `moshi-grpc up`'s, which passes them on to the services.


def add_otel_flag(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--otel-endpoint",
        default=None,
        metavar="URL",
        help="OpenTelemetry tracing: export spans (one per session and per backend stream) to "
        "this OTLP/gRPC collector, http://HOST:4317 (plaintext) or https://... (TLS); needs "
        "the [otel] extra (default: off)",
    )


def _auto_on_off(g: argparse._ActionsContainer, flag: str, help: str) -> None:
    g.add_argument(flag, choices=("auto", "on", "off"), default="auto", help=help)


def add_cuda_graphs_flag(g: argparse._ActionsContainer) -> None:
    _auto_on_off(
        g,
        "--cuda-graphs",
        "capture each batch bucket's step as a CUDA graph at load (auto: on for --device "
        "cuda); saves the per-kernel launch cost of every step",
    )


def add_cpu_forms_flag(g: argparse._ActionsContainer) -> None:
    _auto_on_off(
        g,
        "--cpu-forms",
        "faster exact CPU forms of the model's layers (moshi_grpc/models/cpu_fast.py): auto "
        "= each where a measurement at load says it is faster, on, or off (the plain "
        "model); nothing applies off CPU",
    )


def add_max_sessions_flag(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=DEFAULT_MAX_SESSIONS,
        help="batch slots = concurrent streams per stream kind; extra ones get RESOURCE_EXHAUSTED",
    )


def add_batching_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batching")
    add_max_sessions_flag(g)
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="longest a frame waits for frames of other streams before its batch runs",
    )
    add_cuda_graphs_flag(g)
    g.add_argument(
        "--inject-delay-ms",
        type=float,
        default=0.0,
        help="sleep this long in every batched model call (fault testing: a slow backend)",
    )
    g.add_argument(
        "--idle-probe-s",
        type=float,
        default=DEFAULT_IDLE_PROBE_S,
        help="while no stream is open, re-time one batch bucket about this often and keep the "
        "faster figure (admission reads them; heals a warm-up timed on a busy machine); 0 = off",
    )


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_model_flags(parser: argparse.ArgumentParser, service: str) -> None:
    """Model selection flags; `service` is "codec", "lm" or "all" (both sets, for `up`)."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=["real", "echo"],
        default="real",
        help="real = Mimi / Moshi LM; echo = zero-cost stand-in with the same interface",
    )
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    add_cpu_forms_flag(g)
    g.add_argument(
        "--hf-repo",
        default=None,
        help="download missing weights from this Hugging Face repo "
        "(e.g. kyutai/moshiko-pytorch-bf16; needs the [hf] extra and network)",
    )
    if service in ("codec", "all"):
        g.add_argument(
            "--mimi-weights", default=None, help="Mimi safetensors (none: small random preset)"
        )
        g.add_argument(
            "--mimi-config", default=None, help="Mimi preset: mimi or tiny (default: mimi)"
        )
        g.add_argument("--num-codebooks", type=int, default=8, help="codebooks per frame")
    if service in ("lm", "all"):
        g.add_argument(
            "--moshi-weights", default=None, help="LM safetensors (none: small random preset)"
        )
        g.add_argument(
            "--lm-config",
            default=None,
            help="LM preset (small, tiny, mid, moshiko-7b, personaplex-small, personaplex-7b) "
            "or a kyutai config.json path",
        )
        g.add_argument(
            "--tokenizer", default=None, help="SentencePiece text tokenizer (.model) for pieces"
        )
        g.add_argument(
            "--prefix-cache-mib",
            type=_non_negative_float,
            default=1024.0,
            help="persona models: host memory for cached prompt prefixes, MiB (LRU; 0: none)",
        )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = args.auth_token if args.auth_token is not None else os.environ.get(AUTH_ENV)
    metrics_port = args.metrics_port if args.metrics_port >= 0 else None
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=metrics_port,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        grace_s=args.grace,
        idle_timeout_s=args.idle_timeout_s,
        max_connection_age_s=args.max_connection_age_s or None,
        max_connection_age_grace_s=args.max_connection_age_grace_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=token or None,
    )


def _download(repo: str, filename: str, *, optional: bool = False) -> str | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise WeightsError(
            "--hf-repo needs huggingface_hub: pip install 'moshi-grpc[hf]' "
            "(or pass local files with --mimi-weights/--moshi-weights/--tokenizer)"
        ) from exc
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing file: all end here
        if optional:
            log.info("no %s in %s (%s)", filename, repo, type(exc).__name__)
            return None
        raise WeightsError(
            f"could not download {filename} from Hugging Face repo {repo!r}: "
            f"{type(exc).__name__}: {exc}. Without network access, download the files "
            "elsewhere and pass them with --mimi-weights/--moshi-weights/--tokenizer."
        ) from exc


def resolve_weights(args: argparse.Namespace, service: str) -> None:
    """Fill missing weight paths from `--hf-repo` (in place); checks local paths exist."""
    repo = getattr(args, "hf_repo", None)
    names = {"mimi": HF_MIMI_FILE, "moshi": HF_MOSHI_FILE, "tokenizer": HF_TOKENIZER_FILE}
    if repo:
        config_path = _download(repo, HF_CONFIG_FILE, optional=True)
        if config_path:
            try:
                cfg = json.loads(Path(config_path).read_text())
            except (OSError, ValueError) as exc:
                raise WeightsError(f"bad {HF_CONFIG_FILE} in {repo}: {exc}") from exc
            names["mimi"] = cfg.get("mimi_name", names["mimi"])
            names["moshi"] = cfg.get("moshi_name", names["moshi"])
            names["tokenizer"] = cfg.get("tokenizer_name", names["tokenizer"])
            if service in ("lm", "all") and getattr(args, "lm_config", None) is None:
                args.lm_config = config_path
        if service in ("codec", "all") and not args.mimi_weights:
            args.mimi_weights = _download(repo, names["mimi"])
        if service in ("lm", "all"):
            if not args.moshi_weights:
                args.moshi_weights = _download(repo, names["moshi"])
            if not args.tokenizer:
                args.tokenizer = _download(repo, names["tokenizer"])
    for attr, flag in (
        ("mimi_weights", "--mimi-weights"),
        ("moshi_weights", "--moshi-weights"),
        ("tokenizer", "--tokenizer"),
    ):
        path = getattr(args, attr, None)
        if path and not Path(path).is_file():
            raise WeightsError(f"{flag} file not found: {path}")
