"""The gateway's flags: one table (flag, the setting it fills, its rule, its help), so that the
parser, the defaults (`GatewaySettings`) and the checks cannot drift apart."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from moshi_grpc.services.common.server import read_pem
from moshi_grpc.services.gateway.config import CostSettings, GatewaySettings
from moshi_grpc.services.gateway.discovery import ChannelSettings
from moshi_grpc.services.gateway.pipeline import Pipeline
from moshi_grpc.services.gateway.streams import MODES
from moshi_grpc.services.gateway.text_policy import load_policy

BACKEND_AUTH_ENV = "MOSHI_GRPC_BACKEND_AUTH_TOKEN"

# Channels to backends: generous message limits, keepalive within the backends' enforcement
# (min ping interval 10 s there), and no gRPC-level retries (a session is pinned).
BACKEND_CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
)

RULES: dict[str, Callable[[Any], bool]] = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
}


@dataclass(frozen=True)
class Flag:
    """One setting's flag: `field` of GatewaySettings (`cost.x`: of its CostSettings)."""

    name: str
    field: str
    help: str
    rule: str | None = None  # a key of RULES: what a value must be
    kind: Callable[[str], Any] | None = None  # the parser's type (default: the default's)
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


BACKEND_FLAGS = (
    Flag(
        "--backend-streams",
        "backend_streams",
        "mux: all sessions on a backend replica share one multiplexed stream per stage "
        "(EncodeMux/StepMux/DecodeMux, many sessions per message: far less gateway CPU per "
        "frame); per-session: each session opens its own Encode/Step/Decode streams",
        choices=MODES,
    ),
    Flag(
        "--mux-coalesce-ms",
        "mux_coalesce_ms",
        "mux: on a stream busy enough to collect more entries in this time, wait this long "
        "after the first pending entry before sending (fewer, larger backend messages: less "
        "gateway CPU per frame, for up to this much added latency per stage); 0 (the "
        "default): never wait (at most 20)",
    ),
    Flag(
        "--refresh-interval-s",
        "refresh_interval_s",
        "how often backends are re-resolved and probed (health + Info)",
    ),
)
SESSION_FLAGS = (
    Flag(
        "--budget-ms",
        "default_budget_ms",
        "default per-frame latency budget (a frame's output is due this long after its "
        "input frame is complete; sessions may set their own)",
        ">= 1",
    ),
    Flag(
        "--max-consecutive-misses",
        "default_max_consecutive_misses",
        "default: end a session with DEADLINE_EXCEEDED after this many misses in a row (0 = never)",
    ),
    Flag(
        "--max-backlog-frames",
        "max_backlog_frames",
        "frames of one session allowed at the backends at once; more input is dropped (and "
        "counted) instead of queued",
        ">= 1",
    ),
    Flag(
        "--flow-window-frames",
        "flow_window_frames",
        "sessions with input_pacing FLOW_CONTROL (pre-recorded audio): frames at the backends "
        "at once before the gateway stops reading the client",
        ">= 1",
    ),
    Flag(
        "--resample-quality",
        "resample_quality",
        "soxr resampler quality (LQ: ~20 ms filter delay; HQ: ~38 ms)",
        choices=("LQ", "MQ", "HQ", "VHQ"),
    ),
    Flag(
        "--max-session-s",
        "max_session_s",
        "end a session after this many seconds with its summary, reason "
        '"max_session_length", status DEADLINE_EXCEEDED (0 = unlimited)',
        ">= 0",
    ),
    Flag(
        "--max-sessions-per-client",
        "max_sessions_per_client",
        "live sessions allowed per client (its SessionConfig.client_id, else its IP address); "
        "more are refused with RESOURCE_EXHAUSTED (0 = no limit)",
        ">= 0",
    ),
    Flag(
        "--lm-failover",
        "lm_failover",
        "when a session's LM replica fails, replay its history onto another LM replica with "
        "a free slot and carry on (codec failures still end the session)",
        kind=bool,
    ),
    Flag(
        "--lm-history-steps",
        "lm_history_steps",
        "LM steps of history kept per session for failover replay (the LM's context is 3000 "
        "steps = 240 s; older steps are forgotten)",
        ">= 1",
    ),
    Flag(
        "--retry-after-ms",
        "retry_after_ms",
        "retry hint given with RESOURCE_EXHAUSTED refusals (budget refusals: at least this, "
        "or until the recent step samples that caused them expire)",
    ),
)
PERSONA_FLAGS = (
    Flag(
        "--voice-dir",
        "voice_dir",
        "named voices for persona sessions: a directory of WAV files (any rate; channel 0 of "
        "a multi-channel file), each a voice named by its file's stem (Persona.voice_id; "
        "Gateway.Info lists them). PersonaPlex's .pt voices are not codes: refused",
        kind=str,
    ),
    Flag(
        "--max-voice-s",
        "max_voice_s",
        "the longest voice prompt taken, seconds (inline voices beyond it are "
        "INVALID_ARGUMENT; a longer file in --voice-dir stops the start)",
        "> 0",
    ),
    Flag(
        "--open-answer-timeout-s",
        "open_answer_timeout_s",
        "how long a backend may take over one answer before a session goes live (the LM "
        "applying a persona prompt, the codec one voice frame) before the session is "
        "refused with DEADLINE_EXCEEDED; keep it below the backends' --idle-timeout-s",
        "> 0",
    ),
)
ADMISSION_FLAGS = (
    Flag(
        "--batch-wait-ms",
        "cost.batch_wait_ms",
        "the backends' --max-wait-ms: added once per stage (encode, step, decode) to a new "
        "session's predicted frame latency",
        ">= 0",
    ),
    Flag(
        "--unmeasured-stage-ms",
        "cost.unmeasured_stage_ms",
        "cost assumed per stage on a replica whose Info reports no bucket timings yet (a "
        "fresh replica then refuses budgets below ~55 ms and admits the default)",
        ">= 0",
    ),
    Flag(
        "--cost-sample-ttl-s",
        "cost.sample_ttl_s",
        "how long a replica's recent step-time samples count (half-life a third of it)",
        "> 0",
    ),
)
GROUPS = (
    ("backends", BACKEND_FLAGS),
    ("sessions", SESSION_FLAGS),
    ("persona sessions", PERSONA_FLAGS),
    ("admission from measured cost", ADMISSION_FLAGS),
)


def _default(field: str) -> Any:
    owner: Any = GatewaySettings()
    for part in field.split("."):
        owner = getattr(owner, part)
    return owner


def add_gateway_flags(parser: argparse.ArgumentParser, pipeline: Pipeline) -> None:
    """Every flag of `moshi-grpc gateway` but the common server ones and `--workers`."""
    g = parser.add_argument_group("backends")
    for backend in pipeline.backends:
        g.add_argument(
            f"--{backend.kind}-addr",
            action="append",
            required=True,
            help=f"{backend.kind} replicas: host:port[,host:port...] or dns:///name:port "
            "(every address the name resolves to, re-resolved periodically: Kubernetes "
            "headless services); repeatable",
        )
    g.add_argument(
        "--backend-auth-token",
        default=None,
        help=f"bearer token sent to the backends (default: env {BACKEND_AUTH_ENV})",
    )
    for name, help_text in (
        ("--backend-tls-ca", "PEM CA of the backends' TLS certificates"),
        (
            "--backend-tls-cert",
            "PEM client certificate for backends that require mTLS (with --backend-tls-key)",
        ),
        ("--backend-tls-key", "PEM key of --backend-tls-cert"),
        (
            "--backend-tls-server-name",
            "expected server name in the backends' certificates (when dialing by IP)",
        ),
    ):
        g.add_argument(name, default=None, help=help_text)
    for title, table in GROUPS:
        group = g if title == "backends" else parser.add_argument_group(title)
        for flag in table:
            default = _default(flag.field)
            kw: dict[str, Any] = {"default": default, "help": flag.help}
            if flag.kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif flag.choices is not None:
                kw["choices"] = list(flag.choices)
            else:
                kw["type"] = flag.kind or type(default)
            group.add_argument(flag.name, **kw)
    parser.add_argument(
        "--text-policy",
        metavar="RULES|module:object",
        default=None,
        help="text safety hook (a mitigation, not a guarantee): a rules file (lines "
        "'redact WORD', 'mute[:FRAMES] re:REGEX', 'end WORD') or a module:object with "
        "check(piece, context); see services/gateway/text_policy.py",
    )


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    """The flags' values as settings; ValueError naming the flag whose value breaks its rule."""
    values: dict[str, Any] = {}
    for _, table in GROUPS:
        for flag in table:
            value = getattr(args, flag.dest)
            if flag.rule is not None and not RULES[flag.rule](value):
                raise ValueError(f"{flag.name} must be {flag.rule}, got {value}")
            values[flag.field] = value
    cost = {k.split(".", 1)[1]: values.pop(k) for k in list(values) if k.startswith("cost.")}
    misses = "default_max_consecutive_misses"
    values[misses] = max(0, values[misses])
    settings = GatewaySettings(**values, cost=CostSettings(**cost))
    policy = load_policy(args.text_policy) if args.text_policy else None
    return replace(settings, idle_timeout_s=args.idle_timeout_s, text_policy=policy)


def channels_from_args(args: argparse.Namespace) -> ChannelSettings:
    token = args.backend_auth_token or os.environ.get(BACKEND_AUTH_ENV) or None
    ca = read_pem(args.backend_tls_ca, "--backend-tls-ca")
    cert = read_pem(args.backend_tls_cert, "--backend-tls-cert")
    key = read_pem(args.backend_tls_key, "--backend-tls-key")
    if (cert is None) != (key is None):
        raise ValueError("--backend-tls-cert and --backend-tls-key go together")
    options = list(BACKEND_CHANNEL_OPTIONS)
    if args.backend_tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.backend_tls_server_name))
    return ChannelSettings(
        tls_ca=ca,
        auth_token=token,
        options=tuple(options),
        tls_client_cert=cert,
        tls_client_key=key,
    )
