"""The text safety hook's policy layer (services/gateway/text_policy.py): every action, the
rules file, `module:object` loading, words split over pieces, and the mute window."""

from __future__ import annotations

import sys
import types

import pytest

from moshi_grpc.services.gateway.text_policy import (
    Action,
    Decision,
    PolicyError,
    TextGuard,
    WordListPolicy,
    load_policy,
)

RULES = """
# comments and blank lines are skipped

redact darn
mute:5 re:(?i)secret\\s+code
end forbidden
"""


def _guard(rules: str = RULES, counted: list | None = None) -> TextGuard:
    sink = counted if counted is not None else []
    return TextGuard(WordListPolicy.from_lines(rules), "s1", on_action=sink.append)


def test_pass_redact_mute_end_and_counts() -> None:
    counted: list[Action] = []
    g = _guard(counted=counted)
    v = g.on_text(0, " hello")
    assert v.decision.action is Action.PASS and v.text == " hello" and v.end_reason is None
    v = g.on_text(1, " oh Darn it")  # whole words, any case
    assert v.decision.action is Action.REDACT and v.text == " oh *** it"
    assert not g.muted(1)
    v = g.on_text(2, " the secret code is")
    assert v.decision.action is Action.MUTE and v.text == " the *** is"
    assert [g.muted(t) for t in (1, 2, 6, 7)] == [False, True, True, False]  # frames 2..6
    v = g.on_text(3, " forbidden")
    assert v.decision.action is Action.END and v.text is None
    assert v.end_reason == "text policy ended the session: end forbidden"
    assert counted == [Action.PASS, Action.REDACT, Action.MUTE, Action.END]
    assert g.counts == {Action.PASS: 1, Action.REDACT: 1, Action.MUTE: 1, Action.END: 1}


def test_word_split_over_pieces_acts_once_and_substrings_pass() -> None:
    g = _guard()
    assert g.on_text(0, " the sec").decision.action is Action.PASS
    v = g.on_text(1, "ret co")
    assert v.decision.action is Action.PASS  # "secret co" does not match yet
    v = g.on_text(2, "de now")
    assert v.decision.action is Action.MUTE and v.text == "*** now"
    assert g.on_text(3, " later").decision.action is Action.PASS  # acted once, not again
    assert g.on_text(4, " darning").decision.action is Action.PASS  # not the word "darn"


def test_strongest_action_wins_and_mute_windows_extend() -> None:
    g = _guard()
    v = g.on_text(0, " darn, forbidden")
    assert v.decision.action is Action.END
    g = _guard("mute:3 a\nmute:10 b\n")
    g.on_text(5, " a")
    g.on_text(6, " b")
    assert g.muted(15) and not g.muted(16)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ("shout loud", "unknown action"),
        ("redact", "needs a pattern"),
        ("redact:4 x", "only mute"),
        ("mute:0 x", "1..10000"),
        ("mute:x y", "bad frame count"),
        ("end re:(", "bad regex"),
    ],
)
def test_bad_rules_are_clear_errors(rules: str, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        WordListPolicy.from_lines(rules, "rules.txt")


def test_load_policy_from_file_and_module_object(tmp_path, monkeypatch) -> None:
    path = tmp_path / "rules.txt"
    path.write_text("redact darn\n")
    assert isinstance(load_policy(str(path)), WordListPolicy)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.txt"))

    class Shout:
        def check(self, piece, context):
            return Decision(Action.REDACT, "caps") if piece.isupper() else Decision()

    mod = types.ModuleType("my_policies")
    mod.instance = Shout()
    mod.factory = Shout
    mod.nothing = 3
    monkeypatch.setitem(sys.modules, "my_policies", mod)
    for spec in ("my_policies:instance", "my_policies:factory"):
        g = TextGuard(load_policy(spec))
        assert g.on_text(0, " HEY").text == "***" and g.on_text(1, " hey").text == " hey"
    with pytest.raises(PolicyError, match="no check"):
        load_policy("my_policies:nothing")
    with pytest.raises(PolicyError, match="no_such_module"):
        load_policy("no_such_module:x")


def test_policy_returning_garbage_is_an_error() -> None:
    class Bad:
        def check(self, piece, context):
            return "pass"

    with pytest.raises(PolicyError, match="not a Decision"):
        TextGuard(Bad()).on_text(0, "x")


# --------------------------------------------------------------------------- through a gateway


class _FirstPiece:
    """Acts on the first piece that has a letter in it, then passes everything."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.fired_at: int | None = None

    def check(self, piece, context):
        if self.fired_at is None and any(c.isalnum() for c in piece):
            self.fired_at = context.frame_index
            return self.decision
        return Decision()


@pytest.fixture(scope="module")
def backends():
    """Echo codec + the small random LM (it writes text pieces), shared by the module."""
    from svc_harness import LoopThread

    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    cfg = ServerConfig(host="127.0.0.1", port=0)

    async def start():
        codec = await start_codec_server(
            cfg, CodecOptions(model="echo", max_sessions=4, max_wait_ms=0.0)
        )
        lm = await start_lm_server(
            cfg,
            # the plain model (forms pinned off): "auto" would pick kernels by timing at
            # load, equal to the plain model's only to float rounding, and these tests
            # count the pieces of one greedy, seeded session
            LmOptions(
                model="real", config="small", max_sessions=4, max_wait_ms=0.0, cpu_forms="off"
            ),
        )
        return codec, lm

    loop = LoopThread()
    servers = loop.run(start(), timeout=180)
    try:
        yield loop, servers
    finally:

        async def stop():
            for s in servers:
                await s.stop(0)

        loop.run(stop(), timeout=60)
        loop.close()


def _converse_with_policy(backends, policy):
    """One 3 s session through a gateway with `policy`: (result or error, events, metrics)."""
    from svc_harness import scrape

    from moshi_grpc import audio
    from moshi_grpc.clients import ConverseClient, ConverseError
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings

    loop, (codec, lm) = backends
    settings = GatewaySettings(refresh_interval_s=0.1, text_policy=policy)
    gw = loop.run(
        start_gateway(
            ServerConfig(host="127.0.0.1", port=0, metrics_port=0),
            codec.address,
            lm.address,
            settings,
        )
    )
    events, error, result = [], None, None
    try:
        x = audio.speech_like(3.0, 24000, seed=1)
        with ConverseClient(gw.address) as client:
            client.wait_ready(10)
            conv = client.converse_array(
                x, 24000, seed=5, budget_ms=5000, window_frames=3, text_temperature=0.0
            )
            try:
                for event in conv:
                    events.append(event)
            except ConverseError as exc:
                error = exc
            result = conv
        metrics = scrape(gw.server.metrics_url)
    finally:
        loop.run(gw.stop(0))
    return result, events, error, metrics


def _action_count(metrics, action: str) -> float:
    for labels, value in metrics.get("moshi_gateway_text_policy_actions_total", []):
        if labels.get("action") == action:
            return value
    return 0.0


def test_gateway_pass_and_redact(backends) -> None:
    from moshi_grpc.clients import TextPiece, TextPolicyApplied

    _, events, error, metrics = _converse_with_policy(backends, WordListPolicy.from_lines(""))
    assert error is None
    plain = [e.text for e in events if isinstance(e, TextPiece)]
    assert len(plain) >= 2, "the small LM wrote too little text to police"
    assert not any(isinstance(e, TextPolicyApplied) for e in events)
    # Every piece the policy saw reached the client (a regression: pieces after the first
    # flush used to be appended to a stale outbox list and lost).
    assert _action_count(metrics, "pass") == len(plain)

    policy = WordListPolicy.from_lines(r"redact re:[^\s]+")
    _, events, error, metrics = _converse_with_policy(backends, policy)
    assert error is None
    pieces = [e for e in events if isinstance(e, TextPiece)]
    applied = [e for e in events if isinstance(e, TextPolicyApplied)]
    assert applied and all(e.action == "redact" for e in applied)
    assert all(set(p.text.replace("***", "")) <= {" "} for p in pieces), pieces
    assert {a.frame_index for a in applied} <= {p.frame_index for p in pieces}
    assert _action_count(metrics, "redact") == len(applied)


def test_gateway_mute_silences_audio_from_the_piece_on(backends) -> None:
    from moshi_grpc.clients import AudioFrame, TextPolicyApplied

    policy = _FirstPiece(Decision(Action.MUTE, "test-mute", mute_frames=4))
    _, events, error, metrics = _converse_with_policy(backends, policy)
    assert error is None and policy.fired_at is not None
    f = policy.fired_at
    applied = [e for e in events if isinstance(e, TextPolicyApplied)]
    assert [(a.action, a.frame_index, a.mute_frames) for a in applied] == [("mute", f, 4)]
    frames = {e.frame_index: e for e in events if isinstance(e, AudioFrame)}
    for t in range(f, f + 4):
        if t in frames:
            assert frames[t].silence and not frames[t].samples.any()
    # Frames outside the window are the echo of real input (not silence stand-ins).
    loud = [t for t in frames if t > 1 and not f <= t < f + 4]
    assert loud and not any(frames[t].silence for t in loud)
    assert _action_count(metrics, "mute") == 1


def test_gateway_end_stops_the_session_with_a_clear_status(backends) -> None:
    import grpc

    from moshi_grpc.clients import SessionEnded, TextPiece, TextPolicyApplied

    policy = _FirstPiece(Decision(Action.END, "no-such-talk"))
    _, events, error, metrics = _converse_with_policy(backends, policy)
    assert error is not None and error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "text policy ended the session: no-such-talk" in error.details
    applied = [e for e in events if isinstance(e, TextPolicyApplied)]
    assert [(a.action, a.rule) for a in applied] == [("end", "no-such-talk")]
    # The offending piece is not sent; the summary says why the session ended.
    assert not any(isinstance(e, TextPiece) and e.frame_index == policy.fired_at for e in events)
    ended = [e for e in events if isinstance(e, SessionEnded)]
    assert ended and ended[-1].summary.reason == "text_policy"
    assert _action_count(metrics, "end") == 1
