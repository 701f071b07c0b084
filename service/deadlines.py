"""When a cancelled call counts as one that ran out of time: shared by the scheduler (which work it drops
and why) and the metrics (a call's final code). Must not know: gRPC, the model.

A client's deadline fires first and cancels the call, so the server sees a cancellation a network trip
before its own copy of the deadline (received as a timeout, counted from arrival) runs out. A cancellation
that close to the deadline is counted, and its dropped work reported, as the DEADLINE_EXCEEDED the client saw.
"""

from __future__ import annotations

DEADLINE_SLACK_S = 0.05


def deadline_passed(deadline: float | None, now: float) -> bool:
    """Has `deadline` (time.monotonic(); None: no deadline) passed at `now`, give or take a client's head
    start of DEADLINE_SLACK_S?"""
    return deadline is not None and now >= deadline - DEADLINE_SLACK_S


__all__ = ["DEADLINE_SLACK_S", "deadline_passed"]
