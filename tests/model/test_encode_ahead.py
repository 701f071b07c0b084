"""Offline `classify` in chunks: the next chunk is tokenized on a helper thread while the current one runs,
and chunking changes neither the results nor their order."""

from __future__ import annotations

import threading

import pytest

from model import Item


def _items(n: int) -> list[Item]:
    words = "please summarise the meeting notes and list every action item with its owner"
    words = words.split(" ")
    return [Item(" ".join(words[: 2 + (7 * i) % len(words)] * (1 + i % 5)), id=f"i{i}") for i in range(n)]


def test_chunked_classify_equals_one_chunk(tiny_classifier) -> None:
    items = _items(40)
    whole = tiny_classifier.classify(items, chunk_tokens=0)
    chunked = tiny_classifier.classify(items, chunk_tokens=30)
    assert len(list(tiny_classifier.encode_ahead(items, 30))) > 5
    assert [r.id for r in chunked] == [it.id for it in items]
    for a, b in zip(whole, chunked, strict=True):
        assert a.tokens == b.tokens and a.windows == b.windows and a.flagged_labels == b.flagged_labels
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_next_chunk_is_tokenized_while_the_caller_holds_this_one(tiny_classifier, monkeypatch) -> None:
    clf = tiny_classifier
    encode = clf.encode
    second_started = threading.Event()
    threads: list[str] = []

    def recording_encode(chunk):
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            second_started.set()
        return encode(chunk)

    monkeypatch.setattr(clf, "encode", recording_encode)
    chunks = clf.encode_ahead(_items(12), chunk_tokens=20)
    first = next(chunks)
    # the caller has not asked for chunk 2 yet, and it is already being tokenized
    assert second_started.wait(timeout=10)
    rest = list(chunks)
    assert len(threads) == 1 + len(rest) and all(t.startswith("safety-encode-ahead") for t in threads)
    assert [e.id for e in first + [e for c in rest for e in c]] == [f"i{i}" for i in range(12)]


def test_small_inputs_stay_on_the_calling_thread(tiny_classifier, monkeypatch) -> None:
    clf = tiny_classifier
    encode, threads = clf.encode, []
    monkeypatch.setattr(clf, "encode", lambda c: threads.append(threading.current_thread().name) or encode(c))
    assert len(clf.classify(_items(3))) == 3
    assert threads == [threading.current_thread().name]
    assert clf.classify([]) == [] and threads == [threading.current_thread().name]


def test_the_runner_stays_a_batch_ahead_across_chunks(tiny_classifier, monkeypatch) -> None:
    """Chunks feed one stream of batches: the next chunk's first batch is launched before the last batch of
    the current chunk is read back, so the device never drains at a chunk boundary ("CC" — two reads with no
    launch between them — happens only at the very end)."""
    runner = tiny_classifier.runner
    launch, collect, calls = runner.launch, runner.collect, []
    monkeypatch.setattr(runner, "launch", lambda seqs: calls.append("L") or launch(seqs))
    monkeypatch.setattr(runner, "collect", lambda launched: calls.append("C") or collect(launched))
    items = _items(40)
    chunked = tiny_classifier.classify(items, chunk_tokens=30)
    pattern = "".join(calls)
    assert len(list(tiny_classifier.encode_ahead(items, 30))) > 5 and pattern.count("L") > 5
    assert pattern.startswith("LL") and pattern.endswith("CC") and "CC" not in pattern[:-1], pattern
    assert [r.id for r in chunked] == [it.id for it in items]


def test_chunks_start_at_a_quarter_budget_then_grow_in_measured_tokens(tiny_model_dir, monkeypatch) -> None:
    """On an asynchronous device the device starts after a quarter of a token budget is tokenized, not the
    whole input. The second chunk is half a budget in this tokenizer's own tokens per character, measured on
    the first (4 characters a token was only the first guess); later chunks double, up to four budgets, while
    tokenizing keeps ahead of the caller (timing-dependent, so only bounded here). On the CPU, where the
    forward needs the tokenizer's cores, every chunk is four budgets."""
    import math

    import torch

    from model import load_classifier

    clf = load_classifier(
        tiny_model_dir, device="cpu", max_tokens=128, max_context_tokens=16, max_batch_tokens=600
    )
    text = "a few words about bread and ovens and timing " * 2
    items = [Item(text)] * 300
    per_item = len(clf.encode(items[:1])[0].windows[0])  # tokens of one item, specials included
    assert per_item != (len(text) + 1) / 4  # this tokenizer's ratio is not the first guess
    four_budgets = math.ceil(2400 / per_item)
    cpu = [len(chunk) for chunk in clf.encode_ahead(items)]
    assert cpu[0] == math.ceil(2400 * 4 / (len(text) + 1)) and set(cpu[1:-1]) == {four_budgets}

    monkeypatch.setattr(clf.runner, "device", torch.device("cuda"))  # the policy only: nothing runs on it
    counts = [len(chunk) for chunk in clf.encode_ahead(items)]
    assert counts[:2] == [math.ceil(150 * 4 / (len(text) + 1)), math.ceil(300 / per_item)]
    assert all(n <= four_budgets for n in counts) and sum(counts) == sum(cpu) == len(items)
