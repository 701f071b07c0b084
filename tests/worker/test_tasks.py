"""The chunk task's classification step, in process (the worker-process behaviour is in test_worker_*)."""

from __future__ import annotations

from typing import Any

from worker.store import RESULT_FIELDS, failed_line
from worker.tasks import classify_lines


def test_result_lines_have_the_classify_shape_plus_index_and_error(tiny_classifier: Any) -> None:
    (result,) = tiny_classifier.classify([{"text": "hello"}])
    assert tuple(result.to_dict()) == RESULT_FIELDS
    assert failed_line(3, "a", "why").keys() == {"index", "error", *RESULT_FIELDS}


def test_an_item_the_engine_refuses_fails_alone(tiny_classifier: Any) -> None:
    items = [{"text": "first", "id": "a"}, {"text": "   ", "id": "b"}, {"text": "third", "id": "c"}]
    lines = sorted(classify_lines(tiny_classifier, [10, 11, 12], items), key=lambda x: x[0])
    assert [(i, failed) for i, _, failed in lines] == [(10, False), (11, True), (12, False)]
    assert lines[1][1] == failed_line(11, "b", "items[11].text: must not be empty")
    want = [r.to_dict() for r in tiny_classifier.classify([items[0], items[2]])]
    assert [lines[0][1], lines[2][1]] == [
        {"index": 10, **want[0], "error": None},
        {"index": 12, **want[1], "error": None},
    ]
