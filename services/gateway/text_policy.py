"""Text safety hook: Moshi's inner-monologue text passes a policy before it leaves the gateway.

A mitigation, not a guarantee. The policy sees only the text stream; Moshi speaks what it
writes, but not always word for word, and a word's audio can begin before its text piece is
decoded. What the hook can do per text piece:

- `pass`: send it as is;
- `redact`: send the piece with the match replaced (default "***");
- `mute`: send the piece redacted and replace the session's output audio by silence for N
  frames, starting at the piece's own frame;
- `end`: end the session with PERMISSION_DENIED ("text policy ended the session: <rule>"),
  summary reason "text_policy".

Each action but `pass` is reported as an Event (`TextPolicyApplied`) and every action is
counted in `moshi_gateway_text_policy_actions_total{action}`.

Timing (why the mute window starts at the piece's own frame and lasts about a second): per
80 ms step the LM emits one text token and the audio codes of the same step (text and the
semantic codebook have no delay; the acoustic codebooks lag one step, which the LM absorbs
before it reports `ready`), and the gateway numbers both with the same output frame t. A
word's text piece comes at the step where its audio starts, and the piece is sent as soon as
the LM step returns while audio frame t waits for the codec's decode, so muting from frame t
on silences the word from its start. A spoken word lasts ~3-8 frames, hence the default of
12 frames (960 ms). Audio already sent (a word voiced before its text was written, which the
model may do) cannot be recalled.

Pluggable: `--text-policy module:object` names an object with a `check(piece, context) ->
Decision` method (or a zero-argument factory of one). The built-in `WordListPolicy` reads
rules, one per line: `ACTION[:FRAMES] PATTERN`, e.g.

    redact darn
    mute:20 re:(?i)\\bsecret\\s+code\\b
    end re:(?i)\\bforbidden\\b

Plain patterns are whole words, case-insensitive; `re:` patterns are Python regexes. Matches
are looked for in the recent transcript (so a word split over several pieces is found) but
only a match that ends inside the new piece counts, so each occurrence acts once. The first
rule with the strongest action wins (end > mute > redact).

This module is transport-free: `TextGuard` holds one session's state (transcript window, mute
window, action counts) and returns what to send; the gateway session calls `on_text` where
it turns an LM text piece into a TextPiece and `muted` where it builds an AudioOut.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from moshi_grpc.services.common.errors import ErrorCode, ServiceError

DEFAULT_MUTE_FRAMES = 12  # 960 ms: a spoken word plus the text's lead over its audio
WINDOW_CHARS = 200  # transcript kept for matching words split over pieces
REDACTED = "***"


class Action(str, Enum):
    PASS = "pass"
    REDACT = "redact"
    MUTE = "mute"
    END = "end"


_STRENGTH = {Action.PASS: 0, Action.REDACT: 1, Action.MUTE: 2, Action.END: 3}


@dataclass(frozen=True)
class Decision:
    """What to do with one text piece. `spans` are (start, end) character ranges of the
    piece to redact (all of it when empty and the action is not PASS)."""

    action: Action = Action.PASS
    rule: str = ""
    mute_frames: int = 0
    spans: tuple[tuple[int, int], ...] = ()


PASS = Decision()


@dataclass(frozen=True)
class TextContext:
    """What a policy may look at besides the piece."""

    session_id: str
    frame_index: int
    recent: str  # the transcript just before this piece (up to WINDOW_CHARS characters)


class TextPolicy(Protocol):
    def check(self, piece: str, context: TextContext) -> Decision: ...


class PolicyError(ValueError):
    """A policy file or `module:object` spec that cannot be used."""


class TextPolicyEnded(ServiceError):
    """The text policy ended the session (its `end` action)."""

    code = ErrorCode.REFUSED  # answered as PERMISSION_DENIED


# --------------------------------------------------------------------------- built-in policy


@dataclass(frozen=True)
class Rule:
    action: Action
    pattern: re.Pattern
    source: str
    mute_frames: int = 0


@dataclass
class WordListPolicy:
    """Word and regex rules; see the module docstring for the file format."""

    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def from_lines(cls, lines: list[str] | str, origin: str = "<rules>") -> WordListPolicy:
        if isinstance(lines, str):
            lines = lines.splitlines()
        rules = []
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            head, _, pattern = line.partition(" ")
            pattern = pattern.strip()
            name, _, frames = head.partition(":")
            try:
                action = Action(name.lower())
            except ValueError:
                raise PolicyError(
                    f"{origin}:{n}: unknown action {name!r} (pass, redact, mute[:N], end)"
                ) from None
            if not pattern:
                raise PolicyError(f"{origin}:{n}: a rule needs a pattern after the action")
            if frames and action is not Action.MUTE:
                raise PolicyError(f"{origin}:{n}: only mute takes a frame count")
            try:
                mute = int(frames) if frames else DEFAULT_MUTE_FRAMES
            except ValueError:
                raise PolicyError(f"{origin}:{n}: bad frame count {frames!r}") from None
            if action is Action.MUTE and not 1 <= mute <= 10_000:
                raise PolicyError(f"{origin}:{n}: mute frames must be 1..10000, got {mute}")
            try:
                compiled = (
                    re.compile(pattern[3:])
                    if pattern.startswith("re:")
                    else re.compile(rf"(?i)(?<!\w){re.escape(pattern)}(?!\w)")
                )
            except re.error as exc:
                raise PolicyError(f"{origin}:{n}: bad regex: {exc}") from None
            rules.append(Rule(action, compiled, line, mute if action is Action.MUTE else 0))
        return cls(rules)

    @classmethod
    def from_file(cls, path: str | Path) -> WordListPolicy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read text policy {path}: {exc.strerror}") from None
        return cls.from_lines(text, str(path))

    def check(self, piece: str, context: TextContext) -> Decision:
        text = context.recent + piece
        start = len(context.recent)
        best = PASS
        spans: list[tuple[int, int]] = []
        for rule in self.rules:
            for m in rule.pattern.finditer(text):
                if m.end() <= start or m.end() == m.start():
                    continue  # ended before this piece: it acted already
                if rule.action is Action.PASS:
                    continue
                spans.append((max(0, m.start() - start), m.end() - start))
                if _STRENGTH[rule.action] > _STRENGTH[best.action]:
                    best = Decision(rule.action, rule.source, rule.mute_frames)
        if best.action is Action.PASS:
            return PASS
        return Decision(best.action, best.rule, best.mute_frames, tuple(sorted(spans)))


# --------------------------------------------------------------------------- loading


def load_policy(spec: str) -> TextPolicy:
    """`module:object` -> a policy (an object with `check`, or a zero-argument factory of
    one); a path to a rules file -> a `WordListPolicy`."""
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"--text-policy {spec}: {exc}") from None
        if isinstance(obj, type) or (not hasattr(obj, "check") and callable(obj)):
            obj = obj()  # a class or factory
        if not callable(getattr(obj, "check", None)):
            raise PolicyError(f"--text-policy {spec}: no check(piece, context) method")
        return obj
    return WordListPolicy.from_file(spec)


# --------------------------------------------------------------------------- one session


@dataclass(frozen=True)
class Verdict:
    """What the session sends for one piece: `text` (None: send no text piece), and whether
    to end the session (`end_reason`)."""

    decision: Decision
    text: str | None
    end_reason: str | None = None


class TextGuard:
    """One session's use of a policy: transcript window, mute window, counted actions."""

    def __init__(
        self,
        policy: TextPolicy,
        session_id: str = "",
        on_action: Callable[[Action], None] | None = None,
        replacement: str = REDACTED,
    ) -> None:
        self.policy = policy
        self.session_id = session_id
        self.on_action = on_action
        self.replacement = replacement
        self._recent = ""
        self._mutes: list[tuple[int, int]] = []  # [start, end) output frames to silence
        self.counts: dict[Action, int] = {a: 0 for a in Action}

    def on_text(self, frame_index: int, piece: str) -> Verdict:
        context = TextContext(self.session_id, frame_index, self._recent)
        decision = self.policy.check(piece, context)
        if not isinstance(decision, Decision):
            raise PolicyError(f"text policy returned {type(decision).__name__}, not a Decision")
        self._recent = (self._recent + piece)[-WINDOW_CHARS:]
        action = decision.action
        self.counts[action] += 1
        if self.on_action is not None:
            self.on_action(action)
        if action is Action.PASS:
            return Verdict(decision, piece)
        if action is Action.END:
            return Verdict(
                decision, None, f"text policy ended the session: {decision.rule or 'end'}"
            )
        if action is Action.MUTE:
            frames = decision.mute_frames or DEFAULT_MUTE_FRAMES
            # Windows end in frame order; drop those that ended before this one starts.
            self._mutes = [w for w in self._mutes if w[1] > frame_index]
            self._mutes.append((frame_index, frame_index + frames))
        return Verdict(decision, self._redact(piece, decision.spans))

    def muted(self, frame_index: int) -> bool:
        """Whether output audio frame `frame_index` is to be sent as silence."""
        return any(start <= frame_index < end for start, end in self._mutes)

    def _redact(self, piece: str, spans: tuple[tuple[int, int], ...]) -> str:
        if not spans:
            return self.replacement
        out, pos = [], 0
        for start, end in spans:
            start = max(start, pos)
            if end <= start:
                continue
            out.append(piece[pos:start])
            if not out[-1].endswith(self.replacement):
                out.append(self.replacement)
            pos = end
        out.append(piece[pos:])
        return "".join(out)
