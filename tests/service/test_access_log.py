"""The access log's limit on the lines of failed calls (service/accesslog.py): the token bucket with plain
numbers, the log with a fake clock, and a real server on port 0 refusing calls faster than the limit."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from model.errors import InvalidInputError
from service.accesslog import SUMMARY_EVERY_S, AccessLog, LineLimit
from service.settings import ServeSettings
from tests.service.helpers import request, wait_until


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "safety.access"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_a_seconds_worth_then_the_rate() -> None:
    limit = LineLimit(rate=4)
    assert [limit.allow(0.0, "RESOURCE_EXHAUSTED") for _ in range(6)] == [True] * 4 + [False] * 2
    assert limit.allow(0.1, "RESOURCE_EXHAUSTED") is False  # 0.4 of a line earned back
    assert limit.allow(0.3, "UNAUTHENTICATED") is True  # 0.2 s at 4 a second: one more
    assert limit.allow(10.0, "X") and limit.tokens == 3  # a long quiet refills the burst, no more
    assert limit.allow(5.0, "X") and limit.tokens == 2  # a clock that went back earns nothing, costs nothing


def test_the_lines_left_out_are_handed_over_by_code_at_most_once_a_second() -> None:
    limit = LineLimit(rate=1)
    assert limit.allow(0.0, "A")
    for t, code in ((0.2, "A"), (0.4, "B"), (0.6, "A")):
        assert not limit.allow(t, code)
    assert limit.left_out(0.6) == ({"A": 2, "B": 1}, pytest.approx(0.4))  # from the first refusal to the last
    assert limit.left_out(0.7) is None  # nothing since
    assert not limit.allow(0.8, "A")
    assert limit.left_out(0.8) is None  # a hand-over 0.2 s ago: kept for the next
    assert limit.left_out(0.6 + SUMMARY_EVERY_S) == ({"A": 1}, 0.0)
    assert limit.allow(1.7, "A") and not limit.allow(1.8, "C")  # 0.9 s earned a line back, 0.1 s did not
    assert limit.left_out(1.8, final=True) == ({"C": 1}, 0.0)  # the drain's: due or not


def test_errors_mode_limits_failed_calls_and_summarises_them_before_a_later_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="safety.access")
    clock = Clock()
    log = AccessLog("errors", rate=2, clock=clock)
    for _ in range(5):
        log.call("Classify", "RESOURCE_EXHAUSTED", 0.001, "ipv4:10.0.0.1:1")
    log.call("Classify", "OK", 0.002, "ipv4:10.0.0.1:1")  # no line in `errors`, counted nowhere here
    log.call("Classify", "UNAUTHENTICATED", None, "ipv4:10.0.0.2:1")
    assert [r.code for r in lines(caplog)] == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    clock.now += 1.0
    log.call("Classify", "INVALID_ARGUMENT", 0.001, "ipv4:10.0.0.3:1")
    summary, line = lines(caplog)[2:]
    assert summary.levelno == logging.WARNING
    assert summary.left_out == {"RESOURCE_EXHAUSTED": 3, "UNAUTHENTICATED": 1}
    assert "4 lines of failed calls left out" in summary.getMessage()
    assert "at most 2 a second" in summary.getMessage()
    assert line.code == "INVALID_ARGUMENT" and line.peer == "ipv4:10.0.0.3:1"


def test_all_mode_never_limits_the_lines_of_calls_that_ended_ok(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safety.access")
    log = AccessLog("all", rate=1, clock=Clock())
    log.call("Classify", "UNAVAILABLE", 0.001, "p")
    log.call("Classify", "UNAVAILABLE", 0.001, "p")  # over the limit
    for _ in range(50):
        log.call("Classify", "OK", 0.001, "p")
    codes = [getattr(r, "code", "summary") for r in lines(caplog)]
    # the next line written, an OK one here, brings the summary of the line left out
    assert codes == ["UNAVAILABLE", "summary"] + ["OK"] * 50
    assert lines(caplog)[1].left_out == {"UNAVAILABLE": 1}


def test_rate_zero_is_no_limit_and_off_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safety.access")
    unlimited = AccessLog("errors", rate=0)
    for _ in range(500):
        unlimited.call("Classify", "RESOURCE_EXHAUSTED", 0.001, "p")
    assert len(lines(caplog)) == 500 and unlimited.limit is None
    caplog.clear()
    off = AccessLog("off", rate=5)
    off.call("Classify", "INTERNAL", 0.001, "p")
    off.close()
    assert lines(caplog) == []


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in lines(caplog) if hasattr(r, "left_out")]


def test_a_server_refusing_calls_writes_the_limit_then_a_summary_within_a_second_or_so(
    start_server: Any, stub_for: Any, loop_thread: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten invalid calls against a limit with a burst of one line, then only calls that end OK (no line in
    `errors`): the first failure has its line, the other nine are counted and summarised by the event loop's
    timer a second after the first of them, not at some later failure or at the drain; then the eleventh
    failure, refused too, is summarised at the drain (nothing is left out silently)."""
    caplog.set_level(logging.INFO, logger="safety.access")
    app = start_server(access_log="errors", access_log_rate=0.01)  # a burst of one, then one in 100 s
    stub = stub_for(app)
    for _ in range(10):
        with pytest.raises(grpc.RpcError):
            stub.Classify(request(""), timeout=30)  # an empty text: INVALID_ARGUMENT
    stub.Classify(request("fine"), timeout=30)

    def left_out() -> int:
        return sum(sum(r.left_out.values()) for r in summaries(caplog))

    wait_until(lambda: left_out() == 9, timeout=15, what="the summary of the nine calls over the limit")
    first = lines(caplog)[0]
    assert first.code == "INVALID_ARGUMENT" and first.getMessage() == "call"
    assert all(set(r.left_out) == {"INVALID_ARGUMENT"} for r in summaries(caplog))
    assert not any(hasattr(r, "request_id") for r in summaries(caplog))  # the timer's: no call's id
    with pytest.raises(grpc.RpcError):
        stub.Classify(request(""), timeout=30)
    wait_until(lambda: sum(app.access.limit.refused.values()) == 1, what="the eleventh call, refused")
    loop_thread.run(app.drain(0))
    assert left_out() == 10 and len(lines(caplog)) == 1 + len(summaries(caplog))


def test_no_access_lines_no_count_when_the_log_level_drops_info(caplog: pytest.LogCaptureFixture) -> None:
    """SAFETY_LOG_LEVEL=WARNING drops INFO lines: no summary claims lines were written, none is left out."""
    caplog.set_level(logging.WARNING, logger="safety.access")
    log = AccessLog("errors", rate=1, clock=Clock())
    for _ in range(5):
        log.call("Classify", "RESOURCE_EXHAUSTED", 0.001, "p")
    log.close()
    assert lines(caplog) == [] and log.limit is not None and not log.limit.refused


def test_a_negative_or_nan_rate_is_refused() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match=r"SAFETY_ACCESS_LOG_RATE: must be a finite number >= 0"):
            ServeSettings(access_log_rate=bad)


def test_a_server_whose_log_level_drops_the_access_lines_says_so_at_start(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="safety.access")
    start_server(access_log="errors")
    said = [r.getMessage() for r in caplog.records if r.name == "safety.service"]
    assert any("SAFETY_ACCESS_LOG=errors" in m and "it writes nothing" in m for m in said), said
    caplog.clear()
    caplog.set_level(logging.INFO, logger="safety.access")
    start_server(access_log="errors")
    assert not any("it writes nothing" in r.getMessage() for r in caplog.records)
