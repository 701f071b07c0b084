"""The classifier: the one inference core that the CLI, the gRPC service and the Celery worker share.

Owns: items (text, role, context) -> validated -> token windows -> length-bucketed batches -> logits ->
per-label max over windows -> probabilities, thresholds and the `flagged` verdict, with the character span
of the window that gave each label its score. Steps are public so a dynamic scheduler can interleave them
(see docs/engine-api.md). Must not know: gRPC, Celery, Redis, HTTP, environment variables.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import planner
from model.budget import CPU_BUDGET, Budget, device_budget
from model.config import ModernBertConfig
from model.errors import CheckpointError, ConfigError, InvalidInputError, ModelNotFoundError
from model.items import Fields, check_item, check_unicode, fields_of, item_id, unset_or
from model.loading import LoadReport, load_model
from model.runner import Launched, Runner, resolve_device, resolve_dtype
from model.threads import name_os_thread
from model.tokenizer import TextTokenizer
from model.windows import MAX_TOKENS_PER_CHAR, keep_end, split_windows, window_tokens

DEFAULT_DIR = Path(__file__).parent / "default"
VERSION = "0.1.0"


@dataclass(frozen=True)
class Item:
    text: str
    role: str = "prompt"  # "prompt" (user input) | "response" (LLM output, scored with its prompt as context)
    context: str | None = None  # the prompt that produced a response; only allowed on responses
    id: str | None = None


@dataclass
class Result:
    id: str | None
    scores: dict[str, float]  # label -> probability (max over windows)
    logits: dict[str, float]  # label -> raw logit of the window that gave its score (not the max logit)
    flagged: bool
    flagged_labels: list[str]
    tokens: int  # content tokens of the text (context and special tokens not counted)
    windows: int
    spans: dict[str, tuple[int, int]]  # label -> [start, end) characters of the window giving its score

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = {k: list(v) for k, v in self.spans.items()}
        return d


@dataclass
class Encoded:
    """One item, tokenized and split into model-ready windows."""

    id: str | None
    windows: list[list[int]]  # token ids with specials, each <= max_tokens
    spans: list[tuple[int, int]]  # characters of the text covered by each window
    tokens: int


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # longest sequence the model sees (specials and context included)
    window_overlap: int = 64
    max_context_tokens: int = 256
    max_batch_tokens: int = CPU_BUDGET
    max_batch_sequences: int = 256


@dataclass(frozen=True)
class Rows:
    """A batch's fp32 logits and probabilities as Python lists, one row per window (one conversion per
    batch instead of tensor indexing per item)."""

    logits: list[list[float]]
    probs: list[list[float]]

    @staticmethod
    def of(clf: Classifier, logits: torch.Tensor) -> Rows:
        return Rows(logits.tolist(), clf.probabilities(logits).tolist())


class _Chunk:
    """One chunk of an offline `classify`: its items, its batch plan, and the logits read back so far."""

    def __init__(self, encoded: list[Encoded], plan: list[list[int]], windows: int, labels: int) -> None:
        self.encoded, self.plan = encoded, plan
        self.logits = torch.empty(windows, labels)
        self.read = 0  # batches read back

    def add(self, out: torch.Tensor) -> bool:
        """Store the next batch's logits; True once every batch of the chunk is in."""
        self.logits[self.plan[self.read]] = out
        self.read += 1
        return self.read == len(self.plan)


@dataclass
class Classifier:
    config: ModernBertConfig
    tokenizer: TextTokenizer
    runner: Runner
    limits: Limits
    thresholds: dict[str, float]
    path: str
    report: LoadReport = field(default_factory=LoadReport)
    budget: Budget | None = None  # how max_batch_tokens was chosen (None: set by the caller)
    revision: str = ""  # `checkpoint_revision`: which weights, config and tokenizer score (audit trails)

    @property
    def budget_text(self) -> str:
        """How the batch token budget was chosen, for logs and info(): "set" when the caller set it."""
        return self.budget.describe() if self.budget else "set"

    @property
    def graphs_text(self) -> str:
        """Do small batches replay CUDA graphs: "N buckets up to T tokens (captured in S s, M GiB)", "off", or
        why capture failed."""
        r = self.runner
        if r.graphs is not None:
            return r.graphs.describe()
        return f"off (capture failed: {r.graph_error})" if r.graph_error else "off"

    # ---- description --------------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def device(self) -> str:
        return str(self.runner.device)

    @property
    def dtype(self) -> str:
        return str(self.runner.dtype).removeprefix("torch.")

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def multi_label(self) -> bool:
        return self.config.multi_label

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "labels": self.labels,
            "thresholds": dict(self.thresholds),
            "multi_label": self.multi_label,
            "limits": asdict(self.limits),
            "budget": self.budget_text,
            "device": self.device,
            "dtype": self.dtype,
            "backend": self.backend,
            "compiled": self.runner.compiled,
            "cuda_graphs": self.graphs_text,
            "fused_gemm": self.runner.fused_gemm,
            "version": VERSION,
            "revision": self.revision,
        }

    # ---- validation ---------------------------------------------------------------------------------------
    def coerce_items(self, items: Iterable[Item | Mapping[str, Any]]) -> list[Item]:
        """Items or mappings -> validated Items (`model.items`: the same rules as every front end)."""
        out = []
        for i, raw in enumerate(items):
            if isinstance(raw, Item):  # read like a mapping's fields: an empty role or context is unset
                f = Fields(raw.text, unset_or(raw.role, "prompt"), unset_or(raw.context, None), raw.id)
            else:
                f = fields_of(raw, i)
            check_item(f, i)
            out.append(Item(text=f.text, role=f.role, context=f.context, id=item_id(f.id, i)))
        return out

    def resolve_thresholds(self, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        th = dict(self.thresholds)
        if overrides is not None and not isinstance(overrides, Mapping):
            raise InvalidInputError(
                f"must be a mapping of label to threshold, got {type(overrides).__name__}", field="thresholds"
            )
        for label, value in (overrides or {}).items():
            if label not in th:
                raise InvalidInputError(
                    f"unknown label; labels are {self.labels}", field=f"thresholds.{label}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise InvalidInputError(
                    f"must be a number in [0, 1], got {value!r}", field=f"thresholds.{label}"
                )
            th[label] = float(value)
        return th

    # ---- steps --------------------------------------------------------------------------------------------
    def encode(self, items: Sequence[Item]) -> list[Encoded]:
        """Tokenize and window validated items (thread-safe; the tokenizer releases the GIL)."""
        lim, tpl = self.limits, self.tokenizer.template
        texts = self.tokenizer.encode_batch([it.text for it in items])
        ctx_idx = [i for i, it in enumerate(items) if it.context]
        contexts = dict(
            zip(ctx_idx, self.tokenizer.encode_batch([items[i].context for i in ctx_idx]), strict=True)
        )
        out = []
        for i, (item, tokens) in enumerate(zip(items, texts, strict=True)):
            ids = tokens.ids
            if i in contexts:
                ctx = keep_end(contexts[i].ids, lim.max_context_tokens)
                size = lim.max_tokens - tpl.pair_extra - len(ctx)
                build = lambda w, ctx=ctx: tpl.pair(ctx, w)  # noqa: E731
            else:
                size = lim.max_tokens - tpl.single_extra
                build = tpl.single
            ranges = split_windows(len(ids), size, lim.window_overlap)
            windows = [build(ids[a:b]) for a, b in ranges]
            spans = [tokens.span(a, b) for a, b in ranges] if ids else [(0, len(item.text))]
            out.append(Encoded(id=item.id, windows=windows, spans=spans, tokens=len(ids)))
        return out

    def most_tokens(self, max_chars: int) -> int:
        """The most tokens, in windows (special tokens and the repeated context included), that one item can
        make whose text and context have at most `max_chars` characters each, at MAX_TOKENS_PER_CHAR tokens
        a character: a response whose context keeps its `max_context_tokens` in every window, or a prompt,
        whichever makes more. (A tokenizer whose normalizer expands characters could exceed it.)"""
        lim, tpl = self.limits, self.tokenizer.template
        content = MAX_TOKENS_PER_CHAR * max_chars
        context = min(content, lim.max_context_tokens)
        single, pair = tpl.single_extra, tpl.pair_extra + context
        prompt = window_tokens(content, lim.max_tokens - single, lim.window_overlap, single)
        response = window_tokens(content, lim.max_tokens - pair, lim.window_overlap, pair)
        return max(prompt, response)

    def plan(self, lengths: Sequence[int], priorities: Sequence[float] | None = None) -> list[list[int]]:
        lim = self.limits
        return planner.plan_batches(
            lengths, lim.max_batch_tokens, lim.max_batch_sequences, padded=self.padded, priorities=priorities
        )

    @property
    def asynchronous(self) -> bool:
        """Does `launch` return before the device is done (CUDA)? Then host work overlaps device work: the
        scheduler keeps two batches in flight and `encode_ahead` starts the device on a small first chunk."""
        return self.device.startswith("cuda")

    @property
    def padded(self) -> bool:
        """Does the attention kernel pay for padding (so batches should be priced as max x count)?"""
        return self.backend == "sdpa"

    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Token-id lists -> fp32 logits (n, num_labels) on the CPU."""
        return self.runner.forward(sequences)

    def launch(self, sequences: list[list[int]]) -> Launched:
        """Queue a batch on the device without waiting (a scheduler's runner); `collect` reads it back, and
        then `Launched.device_seconds()` says how long the device spent on it."""
        return self.runner.launch(sequences)

    def collect(self, launched: Launched) -> torch.Tensor:
        """Wait for a launched batch: fp32 logits (n, num_labels) on the CPU."""
        return self.runner.collect(launched)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def aggregate(self, enc: Encoded, window_logits: torch.Tensor, thresholds: Mapping[str, float]) -> Result:
        """Per label, the window with the highest probability (ties: the higher logit, then the first): its
        probability, logit and span. window_logits: (W, L) for the item's W windows."""
        rows = Rows.of(self, window_logits)
        return self.aggregate_rows(enc, rows.logits, rows.probs, thresholds)

    def aggregate_rows(
        self,
        enc: Encoded,
        logit_rows: Sequence[Sequence[float]],
        prob_rows: Sequence[Sequence[float]],
        thresholds: Mapping[str, float],
    ) -> Result:
        """`aggregate` on plain per-window rows (`Rows.of` converts a whole batch with one `tolist()`): no
        tensor op per item, which is what lets the host keep up with a GPU at thousands of items a second."""
        labels = self.labels
        if len(prob_rows) == 1:
            scores, best_logit, arg = list(prob_rows[0]), list(logit_rows[0]), [0] * len(labels)
        else:  # per label, the window of the highest probability (ties: the higher logit, then the first):
            # score, logit and span all come from it (a sigmoid's is also the highest logit, saturated or not)
            windows, columns = range(len(prob_rows)), range(len(labels))
            arg = [max(windows, key=lambda w, j=j: (prob_rows[w][j], logit_rows[w][j])) for j in columns]
            scores = [prob_rows[arg[j]][j] for j in columns]
            best_logit = [logit_rows[arg[j]][j] for j in columns]
        flagged = [lab for lab, p in zip(labels, scores, strict=True) if p >= thresholds[lab]]
        return Result(
            id=enc.id,
            scores=dict(zip(labels, scores, strict=True)),
            logits=dict(zip(labels, best_logit, strict=True)),
            flagged=bool(flagged),
            flagged_labels=flagged,
            tokens=enc.tokens,
            windows=len(enc.windows),
            spans={lab: enc.spans[arg[j]] for j, lab in enumerate(labels)},
        )

    def warmup(self, max_length: int | None = None) -> float:
        """Run representative bucket shapes once (compilation, allocator, kernels) before real traffic.
        Returns the seconds it took. Lengths double from 8 up to `max_length` (default: max_tokens); then one
        batch of mixed lengths whose token count is not a multiple of 16, launched ungraphed: the doubling
        batches and every CUDA graph bucket are multiples of 16, and a kernel specialized on that (Triton
        does, on integer arguments it was not told to leave alone) would otherwise compile again on the
        first real batch."""
        t0 = time.perf_counter()
        top = min(max_length or self.limits.max_tokens, self.limits.max_tokens)
        n = 8
        while True:
            length = min(n, top)
            count = max(1, min(self.limits.max_batch_sequences, self.limits.max_batch_tokens // length // 2))
            self.forward([self.filler(length)] * count)
            if length == top:
                break
            n *= 2
        self.runner.forward([self.filler(n) for n in odd_lengths(top)], graphs=False)
        return time.perf_counter() - t0

    def filler(self, length: int) -> list[int]:
        """A sequence of `length` token ids (CLS, filler, SEP) for warm-ups and timing probes."""
        return [self.config.cls_token_id, *([5] * (length - 2)), self.config.sep_token_id]

    def run_windows(self, sequences: list[list[int]]) -> torch.Tensor:
        """Logits for many sequences, batched by the planner, returned in input order."""
        logits = torch.empty(len(sequences), self.config.num_labels)
        plan = self.plan([len(s) for s in sequences])
        for batch, out in zip(plan, self.runner.run([sequences[i] for i in b] for b in plan), strict=True):
            logits[batch] = out
        return logits

    def encode_ahead(self, items: Sequence[Item], chunk_tokens: int | None = None) -> Iterator[list[Encoded]]:
        """`encode(items)` in consecutive chunks, each tokenized on a helper thread while the caller runs the
        one before (the tokenizer releases the GIL), so tokenization overlaps the device instead of preceding
        it. Chunks hold up to `chunk_tokens` (default: four budgets, enough for the planner's length buckets;
        0: one chunk). On an asynchronous device they grow to it: the first is a quarter of a budget, so the
        device starts after that much is tokenized rather than the whole input; the second is twice that, and
        each later one twice the last while tokenizing keeps ahead of the caller (the chunk was ready when
        asked for). Sizes are estimated from characters, 4 per token until the chunks encoded so far give
        this tokenizer's own ratio (a small BPE vocabulary makes 1-2 characters a token). On a simulated
        1.16M tokens/s device (bench/e2e.py --simulate, 20,000 traffic texts) `classify` reached 0.79 of the
        model alone with fixed chunks of four estimated budgets, 0.96 with these."""
        top = 4 * self.limits.max_batch_tokens if chunk_tokens is None else chunk_tokens
        chars = [len(it.text) + len(it.context or "") + 1 for it in items]
        # a CPU forward runs on the cores the tokenizer needs: small chunks would only cut the planner's
        # length buckets (bench/worker.py: 3-5% slower on 2 cores with them)
        target = min(self.limits.max_batch_tokens / 4, top) if self.asynchronous else top
        per_char = 0.25  # tokens per character, until measured
        end = planner.chunk_end(chars, 0, target / per_char) if top > 0 else len(items)
        if end >= len(items):  # one chunk: no helper thread
            yield from ([self.encode(items)] if items else [])
            return
        start, seen_chars, seen_tokens = 0, 0, 0
        with ThreadPoolExecutor(
            1, "safety-encode-ahead", initializer=name_os_thread, initargs=("safety-ahead",)
        ) as pool:
            future = pool.submit(self.encode, items[start:end])
            first = True
            while True:
                ahead = future.done()  # tokenizing kept ahead of the caller: the next chunk may be larger
                encoded = future.result()
                seen_chars += sum(chars[start:end])
                seen_tokens += sum(len(w) for e in encoded for w in e.windows)
                per_char = seen_tokens / seen_chars
                start = end
                if start < len(items):
                    if ahead or first:
                        target = min(2 * target, top)
                    end = planner.chunk_end(chars, start, target / per_char)
                    future = pool.submit(self.encode, items[start:end])
                first = False
                yield encoded
                if start >= len(items):
                    return

    # ---- one-shot API -------------------------------------------------------------------------------------
    def classify(
        self,
        items: Iterable[Item | Mapping[str, Any]],
        thresholds: Mapping[str, float] | None = None,
        *,
        chunk_tokens: int | None = None,
    ) -> list[Result]:
        """Validate, then classify in chunks (`encode_ahead`: the next chunk is tokenized while this one
        runs); results in item order. The batches of all chunks go to the runner as one stream, so it keeps
        a batch queued ahead across chunk boundaries: the device does not drain while a finished chunk is
        read back and aggregated and the next one is planned."""
        items = self.coerce_items(items)
        th = self.resolve_thresholds(thresholds)
        chunks: deque[_Chunk] = deque()  # planned, not yet fully read back (the runner is one batch ahead)

        def batches() -> Iterator[list[list[int]]]:
            for encoded in self.encode_ahead(items, chunk_tokens):
                sequences = [w for e in encoded for w in e.windows]  # every item has a window: never empty
                plan = self.plan([len(s) for s in sequences])
                chunk = _Chunk(encoded, plan, len(sequences), len(self.labels))
                chunks.append(chunk)
                yield from ([sequences[i] for i in b] for b in chunk.plan)

        results: list[Result] = []
        for out in self.runner.run(batches()):
            chunk = chunks[0]
            if chunk.add(out):
                chunks.popleft()
                rows, k = Rows.of(self, chunk.logits), 0
                for e in chunk.encoded:
                    n = len(e.windows)
                    results.append(self.aggregate_rows(e, rows.logits[k : k + n], rows.probs[k : k + n], th))
                    k += n
        return results

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> torch.Tensor:
        """HF-exact logits for `tokenizer(texts, pairs)` (no context cut); longer inputs: the elementwise max
        over windows (classify's `Result.logits` instead takes each label's from the window of its score)."""
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidInputError(f"has {len(pairs)} entries for {len(texts)} texts", field="pairs")
        for name, values in (("text", texts), ("pairs", pairs or ())):
            for i, t in enumerate(values):
                if not isinstance(t, str):
                    raise InvalidInputError(f"must be a string, got {type(t).__name__}", index=i, field=name)
                check_unicode(t, i, name)
        lim, tpl = self.limits, self.tokenizer.template
        a_ids = self.tokenizer.encode_batch(list(texts))
        b_ids = self.tokenizer.encode_batch(list(pairs)) if pairs is not None else None
        seqs: list[list[int]] = []
        owner: list[int] = []
        for i, ids in enumerate(t.ids for t in a_ids):
            if b_ids is None:
                size, build = lim.max_tokens - tpl.single_extra, tpl.single
                for a, b in split_windows(len(ids), size, lim.window_overlap):
                    seqs.append(build(ids[a:b]))
                    owner.append(i)
            else:
                first, second = ids, b_ids[i].ids
                size = lim.max_tokens - tpl.pair_extra - len(first)
                if size <= lim.window_overlap:
                    raise InvalidInputError("first text leaves no room for the pair", index=i, field="text")
                for a, b in split_windows(len(second), size, lim.window_overlap):
                    seqs.append(tpl.pair(first, second[a:b]))
                    owner.append(i)
        window_logits = self.run_windows(seqs) if seqs else torch.empty(0, self.config.num_labels)
        out = torch.full((len(texts), self.config.num_labels), -math.inf)
        for k, i in enumerate(owner):
            out[i] = torch.maximum(out[i], window_logits[k])
        return out


def odd_lengths(top: int) -> list[int]:
    """Lengths of at most `top` (at least 2: CLS and SEP) whose sum is not a multiple of 16: `Classifier.
    warmup`'s last batch."""
    lengths = [top, min(top, 19), min(top, 3)]
    if sum(lengths) % 16 == 0:
        lengths[-1] -= 1  # 3 -> 2 (with top < 3 the sum is 6)
    return lengths


def read_thresholds(directory: Path, labels: list[str]) -> dict[str, float]:
    """thresholds.json: label -> a probability in [0, 1] that flags, or null: the label is scored but never
    flags (threshold infinity), for the benign class of a softmax classifier such as {0: safe, 1: unsafe},
    whose probabilities sum to 1 so one of them always reaches 0.5. Labels it leaves out take 0.5."""
    th = dict.fromkeys(labels, 0.5)
    path = directory / "thresholds.json"
    if not path.exists():
        return th
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e})", field="<file>", file=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("must map label -> threshold", field="<file>", file=str(path))
    for label, value in raw.items():
        if label not in th:
            raise ConfigError(f"unknown label; labels are {labels}", field=label, file=str(path))
        if value is None:
            th[label] = math.inf
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            why = f"must be a number in [0, 1] or null (never flags), got {value!r}"
            raise ConfigError(why, field=label, file=str(path))
        th[label] = float(value)
    return th


def default_model_dir() -> Path:
    if not (DEFAULT_DIR / "config.json").exists():
        raise ModelNotFoundError(
            f"no model path given and no bundled default model in {DEFAULT_DIR}; pass a checkpoint directory "
            "(config.json + model.safetensors + tokenizer.json), e.g. --model DIR or SAFETY_MODEL=DIR"
        )
    return DEFAULT_DIR


def load_classifier(
    path: str | Path | None = None,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    max_tokens: int | None = None,
    window_overlap: int | None = None,
    max_context_tokens: int | None = None,
    max_batch_tokens: int | None = None,
    max_batch_sequences: int | None = None,
    backend: str | None = None,
    compile: bool | str = False,
    copy_stream: bool = True,
    graphs: bool | None = None,
    graph_tokens: int | None = None,
    fused_gemm: bool | None = False,
) -> Classifier:
    """Load a checkpoint directory (or the bundled default when `path` is None) ready to classify.
    `graphs`: CUDA graphs for batches under `graph_tokens` tokens (None: on for CUDA with a varlen kernel;
    model/graphs.py). `fused_gemm`: Wqkv + RoPE and Wi + GeGLU as fused Triton GEMMs (model/fused.py; None:
    on Hopper cards where they can run, model.runner.measured_card). `backend`: None, the flash kernel on
    CUDA (SDPA on the CPU); "auto", the fastest measured (model.attention.fastest_backend); or a name.
    `max_tokens`, `max_context_tokens`, `window_overlap` unset: `max_position_embeddings`, and
    `window_defaults`."""
    dev = resolve_device(device)
    directory = Path(path) if path is not None else default_model_dir()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    net, config, report = load_model(directory)
    tokenizer = TextTokenizer.from_file(directory / "tokenizer.json")
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )
    runner = Runner(
        net,
        dev,
        resolve_dtype(dtype, dev),
        backend,
        compile=compile,
        copy_stream=copy_stream,
        graphs=graphs,
        graph_tokens=graph_tokens,
        fused_gemm=fused_gemm,
    )
    if max_tokens is None:
        max_tokens = config.max_position_embeddings
    max_context_tokens, window_overlap = window_defaults(
        max_tokens, tokenizer.template.pair_extra, max_context_tokens, window_overlap
    )
    budget = None
    # unset: fixed on the CPU, sized to the free memory on CUDA (model/budget.py); a max_tokens out of range
    # is left to check_limits, which names the field
    if max_batch_tokens is None and 0 < max_tokens <= config.max_position_embeddings:
        t0 = time.perf_counter()
        budget = device_budget(dev, runner.forward, max_tokens)
        runner.timings["budget_probe_s"] = time.perf_counter() - t0
        max_batch_tokens = budget.tokens
    limits = Limits(
        max_tokens=max_tokens,
        window_overlap=window_overlap,
        max_context_tokens=max_context_tokens,
        max_batch_tokens=max_batch_tokens if max_batch_tokens is not None else max_tokens,
        max_batch_sequences=max_batch_sequences or (256 if dev.type == "cpu" else 2048),
    )
    check_limits(limits, config, tokenizer)
    return Classifier(
        config=config,
        tokenizer=tokenizer,
        runner=runner,
        limits=limits,
        thresholds=read_thresholds(directory, config.labels),
        path=str(directory),
        report=report,
        budget=budget,
        revision=checkpoint_revision(directory, report.files),
    )


REVISION_DIGITS = 16


def checkpoint_revision(directory: Path, weights: Sequence[str]) -> str:
    """The first 16 hex digits of a sha256 over what decides a checkpoint's logits: config.json,
    tokenizer.json and the weight files (`weights`, as read), each by name and content. Two checkpoints with
    the same name (a retrained model in the same directory, a rollout) answer with different revisions;
    thresholds.json is not in it (responses carry the thresholds they applied). Costs one read of the
    weights (at load, from the page cache: ~1 s per GB)."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", *weights):
        with (directory / name).open("rb") as f:
            digest.update(f"{Path(name).name}\0".encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:REVISION_DIGITS]


CONTEXT_TOKENS, OVERLAP_TOKENS = 256, 64  # the defaults, where a window has room for them


def window_defaults(
    max_tokens: int, pair_extra: int, context: int | None = None, overlap: int | None = None
) -> tuple[int, int]:
    """(max_context_tokens, window_overlap), each as given or else its default: 256 context tokens and 64
    tokens of overlap wherever the window has room for both beside a response (any window of 324 tokens or
    more with ModernBERT's 3 specials), else at most half the window for the context and at most half of the
    rest for the overlap. A window too short for even that is left to `check_limits`, which names it."""
    free = max_tokens - pair_extra
    if context is None:
        wanted = OVERLAP_TOKENS if overlap is None else overlap
        context = CONTEXT_TOKENS if free - CONTEXT_TOKENS > wanted else max(0, free // 2)
    if overlap is None:
        room = free - context
        overlap = OVERLAP_TOKENS if room > OVERLAP_TOKENS else max(0, (room - 1) // 2)
    return context, overlap


def check_limits(lim: Limits, config: ModernBertConfig, tok: TextTokenizer) -> None:
    src = "limits"
    if not 0 < lim.max_tokens <= config.max_position_embeddings:
        raise ConfigError(
            f"must be in [1, max_position_embeddings={config.max_position_embeddings}], got {lim.max_tokens}",
            field="max_tokens",
            file=src,
        )
    if lim.max_context_tokens < 0:
        raise ConfigError(f"must be >= 0, got {lim.max_context_tokens}", field="max_context_tokens", file=src)
    if lim.window_overlap < 0:
        raise ConfigError(f"must be >= 0, got {lim.window_overlap}", field="window_overlap", file=src)
    room = lim.max_tokens - tok.template.pair_extra - lim.max_context_tokens
    if room <= lim.window_overlap:
        raise ConfigError(
            f"{lim.window_overlap} must be smaller than max_tokens {lim.max_tokens} - max_context_tokens "
            f"{lim.max_context_tokens} - {tok.template.pair_extra} special tokens = {room}; lower "
            "max_context_tokens or window_overlap for a model this short",
            field="window_overlap",
            file=src,
        )
    if lim.max_batch_tokens < lim.max_tokens:
        raise ConfigError(
            f"must be >= max_tokens ({lim.max_tokens}) so the longest window fits a batch",
            field="max_batch_tokens",
            file=src,
        )
    if lim.max_batch_sequences <= 0:
        raise ConfigError("must be positive", field="max_batch_sequences", file=src)
