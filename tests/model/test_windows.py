"""Long inputs: overlapping windows, max aggregation, spans, and the context cut."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from model import Encoded, Item, load_classifier
from model.windows import keep_end, split_windows, window_tokens


@pytest.mark.parametrize("size", [1, 2, 5, 16, 100])
def test_windows_cover_every_token_with_exact_overlap(size: int) -> None:
    for overlap in range(size):
        for n in range(0, 4 * size + 3):
            ws = split_windows(n, size, overlap)
            covered = [False] * n
            for a, b in ws:
                assert 0 <= a < b <= n or (n == 0 and (a, b) == (0, 0))
                assert b - a <= size
                for t in range(a, b):
                    covered[t] = True
            assert all(covered)
            for (_, b1), (a2, _) in itertools.pairwise(ws):
                assert b1 - a2 == overlap  # consecutive windows share exactly `overlap` tokens
            assert ws[-1][1] == n


@pytest.mark.parametrize("size", [1, 2, 5, 16])
def test_window_tokens_counts_the_windows_split_windows_makes(size: int) -> None:
    for overlap in range(size):
        for n in range(0, 6 * size + 3):
            for extra in (0, 2, 7):
                want = sum(b - a + extra for a, b in split_windows(n, size, overlap))
                assert window_tokens(n, size, overlap, extra) == want, (n, size, overlap, extra)
    with pytest.raises(ValueError, match="overlap"):
        window_tokens(10, 4, 4, 0)


def test_most_tokens_is_what_the_worst_text_makes(short_clf) -> None:
    """Emoji are 4 UTF-8 bytes each, and the test tokenizer learned no merge for them: a token per byte, the
    most a byte-level BPE makes. As a prompt, and as a response whose context (of emoji too) fills its share
    of every window; other texts make fewer."""
    for chars in (1, 9, 10, 11, 100, 1000):
        worst = "\U0001f600" * chars
        items = [Item(text=worst), Item(text=worst, role="response", context=worst)]
        made = [sum(len(w) for w in e.windows) for e in short_clf.encode(items)]
        assert short_clf.most_tokens(chars) == max(made), chars
        for text in ("a" * chars, "漢" * chars, "the quick brown fox "[:chars]):
            (e,) = short_clf.encode([Item(text=text, role="response", context=worst)])
            assert sum(len(w) for w in e.windows) <= short_clf.most_tokens(chars)


def test_window_argument_errors() -> None:
    with pytest.raises(ValueError, match="overlap"):
        split_windows(10, 4, 4)
    with pytest.raises(ValueError, match="size"):
        split_windows(10, 0, 0)
    assert keep_end([1, 2, 3, 4], 2) == [3, 4]
    assert keep_end([1, 2], 5) == [1, 2]
    assert keep_end([1, 2], 0) == []


@pytest.fixture(scope="module")
def short_clf(tiny_model_dir):
    # 40-token windows (38 content tokens + [CLS]/[SEP]) with 8 tokens of overlap; contexts cut to 10 tokens
    return load_classifier(
        tiny_model_dir, device="cpu", max_tokens=40, window_overlap=8, max_context_tokens=10
    )


def test_long_text_max_over_windows_and_spans(short_clf) -> None:
    text = " ".join(f"sentence {i} about bread and ovens." for i in range(40))
    (tokens,) = short_clf.tokenizer.encode_batch([text])
    ids, offsets = tokens.ids, tokens.offsets
    (res,) = short_clf.classify([Item(text, id="doc")])
    ranges = split_windows(len(ids), 38, 8)
    assert res.windows == len(ranges) > 3 and res.tokens == len(ids)
    tpl = short_clf.tokenizer.template
    per_window = short_clf.forward([tpl.single(ids[a:b]) for a, b in ranges])  # (W, L)
    expected_logits, arg = per_window.max(dim=0)
    for j, label in enumerate(short_clf.labels):
        assert res.logits[label] == pytest.approx(float(expected_logits[j]), abs=1e-5)
        assert res.scores[label] == pytest.approx(float(torch.sigmoid(expected_logits[j])), abs=1e-6)
        a, b = ranges[int(arg[j])]
        assert tuple(res.spans[label]) == (offsets[a][0], offsets[b - 1][1])
    assert res.id == "doc"
    assert res.flagged == bool(res.flagged_labels)


def test_context_is_cut_from_its_start_and_repeated(short_clf) -> None:
    context = " ".join(f"w{i}" for i in range(60))  # far more than 10 tokens
    response = " ".join(f"r{i}" for i in range(80))
    (enc,) = short_clf.encode(
        short_clf.coerce_items([{"text": response, "role": "response", "context": context}])
    )
    ctx_ids, resp_ids = (t.ids for t in short_clf.tokenizer.encode_batch([context, response]))
    kept = ctx_ids[-10:]
    tpl = short_clf.tokenizer.template
    assert len(enc.windows) > 1
    seen: list[int] = []
    for w in enc.windows:
        assert len(w) <= 40
        assert w[: len(tpl.pair_prefix) + 10] == [*tpl.pair_prefix, *kept]  # the context's end, every window
        body = w[len(tpl.pair_prefix) + 10 + len(tpl.pair_middle) : len(w) - len(tpl.pair_suffix)]
        seen.extend(body)
    assert set(seen) >= set(resp_ids)  # no response token is lost
    # A response without context is scored as a single sequence.
    (solo,) = short_clf.encode(short_clf.coerce_items([{"text": "ok", "role": "response"}]))
    assert solo.windows[0][: len(tpl.single_prefix)] == list(tpl.single_prefix)


def test_response_pair_matches_logits_pair(tiny_classifier) -> None:
    prompt, answer = "How do I bake bread?", "Mix flour, water, salt and yeast; knead; bake."
    (res,) = tiny_classifier.classify([{"text": answer, "role": "response", "context": prompt}])
    ref = tiny_classifier.logits([prompt], [answer])[0]
    for j, label in enumerate(tiny_classifier.labels):
        assert res.logits[label] == pytest.approx(float(ref[j]), abs=1e-5)


def test_order_restored_across_buckets(tiny_classifier) -> None:
    texts = [("word " * n).strip() for n in (300, 1, 50, 2, 120, 7)]
    results = tiny_classifier.classify([{"text": t, "id": str(i)} for i, t in enumerate(texts)])
    assert [r.id for r in results] == [str(i) for i in range(len(texts))]
    solo = [tiny_classifier.classify([{"text": t}])[0] for t in texts]
    for r, s in zip(results, solo, strict=True):
        for label in tiny_classifier.labels:
            assert r.logits[label] == pytest.approx(s.logits[label], abs=1e-5)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_aggregate_on_rows_equals_the_tensor_reductions(short_clf, problem_type: str) -> None:
    # sigmoid and softmax heads; windows tie on some labels (the first window reaching the max wins)
    config = dataclasses.replace(short_clf.config, problem_type=problem_type)
    clf = dataclasses.replace(short_clf, config=config)
    L = len(clf.labels)
    g = torch.Generator().manual_seed(3)
    window_logits = torch.randn(4, L, generator=g)
    window_logits[0, 0] = window_logits[:, 0].max() + 1
    window_logits[2] = window_logits[0]  # windows 0 and 2 tie on every label, softmax included
    enc = Encoded(id="x", windows=[[1]] * 4, spans=[(0, 5), (5, 9), (9, 14), (14, 20)], tokens=17)
    th = dict.fromkeys(clf.labels, 0.3)
    res = clf.aggregate(enc, window_logits, th)
    probs = clf.probabilities(window_logits)
    best_p, arg = probs.max(dim=0)
    # exact equality: the same fp32 values, read with tolist() instead of float()
    assert res.scores == {lab: float(best_p[j]) for j, lab in enumerate(clf.labels)}
    # score, logit and span of a label come from one window
    assert res.logits == {lab: float(window_logits[int(arg[j]), j]) for j, lab in enumerate(clf.labels)}
    if clf.multi_label:  # a sigmoid's highest probability is its highest logit
        assert res.logits == {lab: float(window_logits[:, j].max()) for j, lab in enumerate(clf.labels)}
    assert res.spans == {lab: enc.spans[int(arg[j])] for j, lab in enumerate(clf.labels)}
    assert res.spans[clf.labels[0]] == (0, 5)
    assert res.flagged_labels == [lab for lab in clf.labels if res.scores[lab] >= 0.3]
    assert (res.windows, res.tokens, res.id) == (4, 17, "x")


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_a_label_s_score_logit_and_span_come_from_one_window(short_clf, problem_type: str) -> None:
    """Sigmoid: two windows whose probabilities both round to 1.0 are told apart by their logits (the span
    and logit of the stronger one). Softmax: a label's highest logit need not be in the window of its highest
    probability; the logit reported is that window's, not a maximum taken from another window."""
    config = dataclasses.replace(short_clf.config, problem_type=problem_type)
    clf = dataclasses.replace(short_clf, config=config)
    L = len(clf.labels)
    rows = torch.zeros(2, L)
    if clf.multi_label:
        rows[0, 0], rows[1, 0] = 20.0, 30.0  # sigmoid: 1.0 in fp32 both
        want = 1
    else:
        rows[0, 0], rows[1, 0], rows[1, 1] = 2.0, 3.0, 9.0  # label 0: p .55 in window 0, .0025 in 1
        want = 0
    enc = Encoded(id="x", windows=[[1]] * 2, spans=[(0, 5), (5, 9)], tokens=9)
    res = clf.aggregate(enc, rows, dict.fromkeys(clf.labels, 0.5))
    label = clf.labels[0]
    assert res.spans[label] == enc.spans[want]
    assert res.logits[label] == float(rows[want, 0])
    assert res.scores[label] == float(clf.probabilities(rows)[want, 0])


def test_token_spans_match_the_offsets_of_every_range(tiny_classifier) -> None:
    """`Tokens.span` reads two offsets from the Rust encoding instead of converting the whole list: it must
    give the same characters as the full offsets list for any token range, multi-byte characters included."""
    texts = ["plain words", "déjà vu — naïve café", "日本語の文", "😀👍🏽 mixed 😀 text", " \t\n x", "a"]
    for tokens, text in zip(tiny_classifier.tokenizer.encode_batch(texts), texts, strict=True):
        offsets = tokens.offsets
        assert len(offsets) == len(tokens.ids) > 0
        for a in range(len(offsets)):
            for b in range(a + 1, len(offsets) + 1):
                assert tokens.span(a, b) == (offsets[a][0], offsets[b - 1][1]), (text, a, b)
        assert 0 <= tokens.span(0, len(offsets))[0] <= tokens.span(0, len(offsets))[1] <= len(text)
