"""The text safety hook in a session: each text piece of the LM passes the policy
(text_policy.py) on its way to the client, and output audio it mutes is sent as silence."""

from __future__ import annotations

import logging

from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway import replies
from moshi_grpc.services.gateway.text_policy import (
    Action,
    TextGuard,
    TextPolicy,
    TextPolicyEnded,
)

log = logging.getLogger(__name__)


class TextHook:
    """One session's text pieces, through `policy` when there is one (None: sent as is)."""

    def __init__(self, policy: TextPolicy | None, session_id: str, metrics: GatewayMetrics):
        self._guard = None
        if policy is not None:
            count = metrics.text_policy_actions
            self._guard = TextGuard(policy, session_id, lambda a: count.labels(a.value).inc())

    def piece(self, frame: int, text: str) -> tuple[list[replies.Response], TextPolicyEnded | None]:
        """The replies for one piece of output frame `frame` (a TextPolicyApplied event
        first, when the policy acted), and the end of the session when it ends it."""
        if self._guard is None:
            return [replies.text_piece(frame, text)], None
        verdict = self._guard.on_text(frame, text)
        decision = verdict.decision
        if decision.action is Action.PASS:
            return [replies.text_piece(frame, text)], None
        log.info("text policy: %s at frame %d (%s)", decision.action.value, frame, decision.rule)
        out = [replies.policy_applied(frame, decision)]
        if verdict.text is not None:
            out.append(replies.text_piece(frame, verdict.text))
        end = None if verdict.end_reason is None else TextPolicyEnded(verdict.end_reason)
        return out, end

    def muted(self, frame: int) -> bool:
        """Whether output audio frame `frame` is sent as silence."""
        return self._guard is not None and self._guard.muted(frame)
