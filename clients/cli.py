"""`moshi-grpc converse IN OUT`: one conversation from an audio file through a gateway.

Streams the file (a wav, or Ogg Opus by suffix .opus/.ogg; at real-time pace with `--realtime`,
else as fast as the gateway keeps up: a few frames in flight, so its backlog never drops
input) in the wire encoding chosen by `--encoding` (pcm16, float32, G.711 mulaw/alaw, Ogg
opus), writes Moshi's reply at the input's sample rate (a wav, or Ogg Opus for an .opus/.ogg
OUT), the inner-monologue text with `--transcript`, and prints a latency and bit-rate summary
(client-observed and the gateway's own). Progress goes to stderr on long files.

Persona sessions (a persona model behind the gateway, e.g. NVIDIA PersonaPlex): `--voice
NAME|FILE --prompt TEXT`, both required together (a persona has a voice and a prompt): NAME is
one of the gateway's voices (`--list-voices` prints them), FILE a WAV recording sent with the
session (a path ending in .wav, or any existing file). PersonaPlex's `.pt` voices are refused:
they are not audio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .events import (
    AudioFrame,
    BudgetMissed,
    Failover,
    FramesDropped,
    SessionStarted,
    TextPolicyApplied,
)
from .options import (
    ClientConfigError,
    ConverseError,
    Persona,
    RetryPolicy,
    SessionOptions,
    TlsOptions,
    pacing_for,
)

ADDR_ENV = "MOSHI_GRPC_ADDR"
TOKEN_ENV = "MOSHI_GRPC_AUTH_TOKEN"  # the same variable the services read
DEFAULT_ADDR = "127.0.0.1:50051"
PROGRESS_MIN_S = 10.0  # files shorter than this get no progress lines
PROGRESS_EVERY_S = 5.0  # one progress line per this much reply audio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        metavar="IN",
        nargs="?",
        help="wav (mixed down to mono) or .opus/.ogg file to send",
    )
    parser.add_argument(
        "output",
        metavar="OUT",
        nargs="?",
        help="where to write Moshi's reply: .wav, or .opus/.ogg",
    )
    parser.add_argument("--transcript", metavar="PATH", help="write the text pieces here")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="send at real-time pace, like a microphone (default: as fast as the gateway keeps up)",
    )
    parser.add_argument(
        "--addr",
        default=os.environ.get(ADDR_ENV, DEFAULT_ADDR),
        help=f"gateway host:port or any gRPC target (default: env {ADDR_ENV} or {DEFAULT_ADDR})",
    )
    parser.add_argument(
        "--token", default=None, help=f"bearer token (default: env {TOKEN_ENV}, if set)"
    )
    t = parser.add_argument_group("TLS")
    t.add_argument("--tls", action="store_true", help="use TLS with the system root CAs")
    t.add_argument("--tls-ca", metavar="PEM", help="root CA of the gateway's certificate")
    t.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    t.add_argument("--tls-key", metavar="PEM", help="client private key (mTLS)")
    t.add_argument("--tls-server-name", help="expected name in the gateway's certificate")
    s = parser.add_argument_group("session")
    s.add_argument("--budget-ms", type=int, help="per-frame latency budget (gateway default)")
    s.add_argument(
        "--max-consecutive-misses", type=int, help="end after this many misses (0 = never)"
    )
    s.add_argument("--seed", type=int, help="seed for a reproducible reply")
    s.add_argument("--temperature", type=float, help="text and audio temperature (0 = greedy)")
    s.add_argument("--text-temperature", type=float, help="text temperature (overrides)")
    s.add_argument("--audio-temperature", type=float, help="audio temperature (overrides)")
    s.add_argument("--text-top-k", type=int, help="text top-k (0 = off)")
    s.add_argument("--audio-top-k", type=int, help="audio top-k (0 = off)")
    s.add_argument(
        "--encoding",
        choices=["pcm16", "float32", "mulaw", "alaw", "opus"],
        default="pcm16",
        help="wire encoding both ways: PCM, G.711 mu-law/A-law (telephony), or Ogg Opus "
        "(an .opus/.ogg IN is sent as is)",
    )
    s.add_argument("--client-id", default="moshi-grpc-cli", help="label in the gateway's logs")
    p = parser.add_argument_group("persona (a persona model behind the gateway, e.g. PersonaPlex)")
    p.add_argument(
        "--voice",
        metavar="NAME|FILE",
        help="the model's voice: one of the gateway's voices (--list-voices), or a WAV file "
        "sent with the session (channel 0; at most the gateway's --max-voice-s, 30 s by "
        "default); needs --prompt",
    )
    p.add_argument(
        "--prompt", metavar="TEXT", help="the model's role (system prompt); needs --voice"
    )
    p.add_argument(
        "--list-voices",
        action="store_true",
        help="print the gateway's voices and whether it serves personas, then exit (no IN/OUT)",
    )
    c = parser.add_argument_group("client")
    c.add_argument("--chunk-ms", type=float, default=80.0, help="audio per message")
    c.add_argument(
        "--window-frames",
        type=int,
        default=4,
        help="frames in flight when not --realtime (0 = send without waiting)",
    )
    c.add_argument("--timeout", type=float, default=None, help="session deadline, seconds")
    c.add_argument(
        "--retries", type=int, default=4, help="session-start attempts on overload (>= 1)"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsOptions(
        root_ca=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        server_name=args.tls_server_name,
    )


def _persona(args: argparse.Namespace) -> Persona | None:
    """--voice and --prompt as a Persona; both or neither (a persona has a voice and a
    prompt: PersonaPlex needs both, and the contract requires both)."""
    if args.voice is None and args.prompt is None:
        return None
    if args.voice is None:
        raise ClientConfigError(
            "--prompt needs --voice: a persona has a voice and a prompt (a name from "
            "--list-voices, or a WAV file)"
        )
    if args.prompt is None:
        raise ClientConfigError("--voice needs --prompt: a persona has a voice and a prompt")
    return Persona.from_voice(args.voice, args.prompt)


def _session(args: argparse.Namespace, sample_rate: int) -> SessionOptions:
    text_t = args.text_temperature if args.text_temperature is not None else args.temperature
    audio_t = args.audio_temperature if args.audio_temperature is not None else args.temperature
    return SessionOptions(
        sample_rate=sample_rate,
        encoding=args.encoding,
        text_temperature=text_t,
        audio_temperature=audio_t,
        text_top_k=args.text_top_k,
        audio_top_k=args.audio_top_k,
        seed=args.seed,
        budget_ms=args.budget_ms,
        max_consecutive_misses=args.max_consecutive_misses,
        client_id=args.client_id,
        input_pacing=pacing_for(args.realtime),
        persona=_persona(args),
    )


class _Progress:
    """One stderr line every few seconds of reply audio, only for long inputs."""

    def __init__(self, total_s: float, enabled: bool) -> None:
        self.total_s = total_s
        self.enabled = enabled and total_s >= PROGRESS_MIN_S
        self.done_s = 0.0
        self.next_s = PROGRESS_EVERY_S
        self.misses = 0
        self.t0 = time.monotonic()

    def __call__(self, event) -> None:
        if isinstance(event, BudgetMissed):
            self.misses += 1
        elif isinstance(event, FramesDropped):
            print(f"  {event.count} input frames dropped ({event.reason})", file=sys.stderr)
        elif isinstance(event, Failover):
            print(
                f"  failover {event.from_replica} -> {event.to_replica} "
                f"({event.frames_lost} frames lost)",
                file=sys.stderr,
            )
        elif isinstance(event, TextPolicyApplied):
            print(
                f"  text policy: {event.action} at frame {event.frame_index} ({event.rule})",
                file=sys.stderr,
            )
        elif isinstance(event, SessionStarted) and self.enabled:
            print(f"session {event.session_id} started", file=sys.stderr)
        if not isinstance(event, AudioFrame):
            return
        self.done_s = (event.frame_index + 1) * 0.08  # output frame t answers 80 ms of input
        if self.enabled and self.done_s >= self.next_s:
            self.next_s += PROGRESS_EVERY_S
            pct = min(100.0, 100.0 * self.done_s / self.total_s)
            elapsed = time.monotonic() - self.t0
            print(
                f"  {self.done_s:6.1f} / {self.total_s:.1f} s ({pct:3.0f}%), "
                f"{elapsed:.1f} s elapsed, {self.misses} budget misses",
                file=sys.stderr,
            )


def _summary(result, in_s: float, wall_s: float, args: argparse.Namespace) -> dict:
    st = result.started
    srv = result.summary
    lat = result.latency
    return {
        "session_id": st.session_id if st else None,
        "codec_replica": st.codec_replica if st else None,
        "lm_replica": st.lm_replica if st else None,
        "model": st.model if st else None,
        "budget_ms": st.budget_ms if st else None,
        "input_pacing": pacing_for(args.realtime),
        "attempts": result.attempts,
        "input_s": round(in_s, 3),
        "wall_s": round(wall_s, 3),
        "frames": result.frames,
        "silence_frames": result.silence_frames,
        "budget_misses": result.budget_misses,
        "frames_dropped": result.frames_dropped,
        "client_latency_ms": {
            "p50": round(lat.p50_ms, 2),
            "p95": round(lat.p95_ms, 2),
            "p99": round(lat.p99_ms, 2),
            "max": round(lat.max_ms, 2),
            "first_audio": None if lat.first_audio_ms is None else round(lat.first_audio_ms, 2),
        },
        "gateway_latency_ms": None
        if srv is None
        else {
            "p50": round(srv.latency_p50_ms, 2),
            "p95": round(srv.latency_p95_ms, 2),
            "p99": round(srv.latency_p99_ms, 2),
        },
        "persona": None if st is None or st.persona is None else vars(st.persona),
        "end_reason": srv.reason if srv else None,
        "transcript_chars": len(result.transcript),
        "output": str(args.output),
        "wire": {
            "encoding": args.encoding,
            "bytes_sent": result.bytes_sent,
            "bytes_received": len(result.data),
            "sent_bytes_per_s": round(result.bytes_sent / in_s, 1) if in_s else None,
            "received_bytes_per_s": round(len(result.data) / (result.frames * 0.08), 1)
            if result.frames
            else None,
        },
    }


def _print_summary(s: dict) -> None:
    print(
        f"session {s['session_id']}  model {s['model']}  codec {s['codec_replica']}  "
        f"lm {s['lm_replica']}  budget {s['budget_ms']} ms  pacing {s['input_pacing']}  "
        f"attempts {s['attempts']}"
    )
    print(
        f"audio: {s['input_s']:.2f} s in {s['wall_s']:.2f} s wall; frames {s['frames']} out, "
        f"{s['silence_frames']} silence, {s['budget_misses']} budget misses, "
        f"{s['frames_dropped']} dropped; end: {s['end_reason']}"
    )
    p = s["persona"]
    if p is not None:
        voice = f"voice {p['voice_id']} (named)" if p["voice_id"] else "voice inline"
        encode = f"{p['voice_encode_ms']:.1f} ms" if p["voice_encode_ms"] else "kept codes"
        print(
            f"persona: {voice}, {p['voice_frames']} voice frames, {p['prompt_frames']} prompt "
            f"frames, {'cached' if p['cached'] else 'prefilled'}; voice encode {encode}, "
            f"prompt ready {p['prompt_ready_ms']:.1f} ms"
        )
    c = s["client_latency_ms"]
    first = "n/a" if c["first_audio"] is None else f"{c['first_audio']:.1f} ms"
    print(
        # from the chunk's send: as a file, that includes waiting in the send window
        f"latency per frame (client): p50 {c['p50']:.1f} ms  p95 {c['p95']:.1f} ms  "
        f"p99 {c['p99']:.1f} ms  max {c['max']:.1f} ms  first audio {first}"
    )
    g = s["gateway_latency_ms"]
    if g is not None:
        print(
            f"latency per frame (gateway): p50 {g['p50']:.1f} ms  p95 {g['p95']:.1f} ms  "
            f"p99 {g['p99']:.1f} ms"
        )
    w = s["wire"]

    def rate(v):
        return "n/a" if v is None else f"{v:.0f} B/s ({v * 8 / 1000:.1f} kbit/s)"

    print(
        f"wire ({w['encoding']}): sent {w['bytes_sent']} bytes, {rate(w['sent_bytes_per_s'])}; "
        f"received {w['bytes_received']} bytes, {rate(w['received_bytes_per_s'])}"
    )


def _input_chunks(args: argparse.Namespace, samples, rate: int):
    """(the chunks to send, the session's sample rate) for the input file.

    An Ogg Opus file sent as Ogg Opus goes as is, cut into byte pieces of about `chunk_ms`
    (anywhere: the gateway takes the stream split at any byte). Other audio goes as samples;
    for Ogg Opus at a rate Opus cannot code, resampled up to the next rate it can.
    """
    from moshi_grpc import audio

    from .source import chunk_array

    if args.encoding == audio.OGG_OPUS and audio.is_opus_path(args.input):
        raw = Path(args.input).read_bytes()
        duration_ms = max(1.0, 1000.0 * len(samples) / rate)
        step = max(1, int(len(raw) * args.chunk_ms / duration_ms))
        return (raw[i : i + step] for i in range(0, len(raw), step)), rate
    if args.encoding == audio.OGG_OPUS and rate not in audio.OPUS_RATES:
        target = min((r for r in audio.OPUS_RATES if r >= rate), default=audio.OPUS_RATES[-1])
        resampler = audio.StreamResampler(rate, target)
        samples = np.concatenate([resampler.process(samples), resampler.flush()])
        rate = target
    return chunk_array(samples, rate, args.chunk_ms), rate


def _write_reply(args: argparse.Namespace, result, rate: int) -> None:
    """The reply as a wav, or Ogg Opus by suffix. An Ogg Opus session's stream is written as
    received (no second lossy coding); G.711 sessions write a G.711 wav (lossless)."""
    from moshi_grpc import audio

    if audio.is_opus_path(args.output):
        if args.encoding == audio.OGG_OPUS and result.data:
            Path(args.output).write_bytes(result.data)
        else:
            audio.write_opus(args.output, result.audio, rate)
        return
    encoding = args.encoding if args.encoding in (audio.MULAW, audio.ALAW) else audio.PCM16
    audio.write_wav(args.output, result.audio, rate, encoding=encoding)


def _list_voices(args: argparse.Namespace, token: str | None) -> int:
    from .sync_client import ConverseClient

    try:
        with ConverseClient(args.addr, tls=_tls(args), token=token) as client:
            info = client.info(timeout=args.timeout or 10.0)
    except (ConverseError, ValueError) as exc:
        print(f"converse: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"persona": info.persona, "version": info.version,
                          "voices": [vars(v) for v in info.voices]}))  # fmt: skip
        return 0
    served = "serves" if info.persona else "does not serve"
    print(f"gateway {args.addr} (moshi-grpc {info.version}) {served} persona sessions")
    for v in info.voices:
        print(f"  {v.voice_id}  {v.duration_s:.1f} s  {v.frames} frames")
    if not info.voices:
        print("  no named voices (the gateway has no --voice-dir); --voice FILE.wav still works")
    return 0


def run(args: argparse.Namespace) -> int:
    from moshi_grpc import audio

    from .result import ConverseResult
    from .source import paced
    from .sync_client import ConverseClient

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if args.list_voices:
        return _list_voices(args, token)
    if args.input is None or args.output is None:
        print("converse: IN and OUT are required (or --list-voices)", file=sys.stderr)
        return 2
    try:
        samples, rate = audio.read_audio(args.input)
        chunks, rate = _input_chunks(args, samples, rate)
        session = _session(args, rate)
        retry = RetryPolicy(max_attempts=args.retries)
        tls = _tls(args)
    except (OSError, ValueError) as exc:
        print(f"converse: {exc}", file=sys.stderr)
        return 2
    in_s = len(samples) / rate
    window = None
    if args.realtime:
        chunks = paced(chunks, rate, args.encoding)
    elif args.window_frames > 0:
        window = args.window_frames
    progress = _Progress(in_s, enabled=not args.no_progress)
    t0 = time.monotonic()
    error: ConverseError | None = None
    with ConverseClient(args.addr, tls=tls, token=token, retry=retry) as client:
        conv = client.converse(chunks, session, timeout=args.timeout, window_frames=window)
        builder = ConverseResult.builder()
        try:
            for event in conv:
                builder.add(event)
                progress(event)
        except ConverseError as exc:
            error = exc
        result = builder.build(conv)
    wall_s = time.monotonic() - t0
    # Whatever came back is written, also after an error: a partial reply helps debugging.
    if result.frames or error is None:
        _write_reply(args, result, rate)
    if args.transcript:
        Path(args.transcript).write_text(result.transcript + "\n", encoding="utf-8")
    summary = _summary(result, in_s, wall_s, args)
    if error is not None:
        summary["error"] = {"code": error.code.name, "details": error.details}
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    if error is not None:
        print(f"converse: session failed: {error}", file=sys.stderr)
        return 1
    return 0
