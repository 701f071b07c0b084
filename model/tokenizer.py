"""Tokenization through the `tokenizers` library alone, reading a checkpoint's `tokenizer.json`, with what
transformers applies over it from `tokenizer_config.json` / `special_tokens_map.json` (added and special
tokens, `split_special_tokens`).

Owns: text -> content token ids with character offsets (no specials, no truncation, no padding), and the
special-token template of the checkpoint (`[CLS] A [SEP]`, `[CLS] A [SEP] B [SEP]`), read off the file's own
post-processor so our ids equal Hugging Face's fast tokenizer loaded from the same files. Also trains small
byte-level BPE tokenizers with ModernBERT's specials (for `safety train` and the tests).
Must not know: windows, models, devices.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Encoding, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.errors import CheckpointError

SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")


@dataclass(frozen=True)
class Template:
    """Special-token ids around content: single = prefix A suffix; pair = prefix A middle B suffix."""

    single_prefix: tuple[int, ...]
    single_suffix: tuple[int, ...]
    pair_prefix: tuple[int, ...]
    pair_middle: tuple[int, ...]
    pair_suffix: tuple[int, ...]

    @property
    def single_extra(self) -> int:
        return len(self.single_prefix) + len(self.single_suffix)

    @property
    def pair_extra(self) -> int:
        return len(self.pair_prefix) + len(self.pair_middle) + len(self.pair_suffix)

    def single(self, a: Sequence[int]) -> list[int]:
        return [*self.single_prefix, *a, *self.single_suffix]

    def pair(self, a: Sequence[int], b: Sequence[int]) -> list[int]:
        return [*self.pair_prefix, *a, *self.pair_middle, *b, *self.pair_suffix]


def _split(ids: list[int], seq_ids: list[int | None]) -> list[tuple[int | None, list[int]]]:
    runs: list[tuple[int | None, list[int]]] = []
    for i, s in zip(ids, seq_ids, strict=True):
        if runs and runs[-1][0] == s:
            runs[-1][1].append(i)
        else:
            runs.append((s, [i]))
    return runs


def read_template(tok: Tokenizer) -> Template:
    """Derive the special-token template from the tokenizer's post-processor."""
    single = tok.encode("a", add_special_tokens=True)
    pair = tok.encode("a", "b", add_special_tokens=True)
    s_runs = _split(single.ids, single.sequence_ids)
    p_runs = _split(pair.ids, pair.sequence_ids)
    s_pre = s_runs[0][1] if s_runs[0][0] is None else []
    s_suf = s_runs[-1][1] if s_runs[-1][0] is None else []
    p_pre = p_runs[0][1] if p_runs[0][0] is None else []
    p_suf = p_runs[-1][1] if p_runs[-1][0] is None else []
    mids = [ids for s, ids in p_runs[1:-1] if s is None]
    return Template(tuple(s_pre), tuple(s_suf), tuple(p_pre), tuple(mids[0] if mids else []), tuple(p_suf))


@dataclass(frozen=True, slots=True)
class Tokens:
    """One text's content token ids, with character spans read from the Rust encoding on demand: windows
    need two offsets each, and converting a whole offsets list to Python tuples costs ~90 ns per token under
    the GIL (~17 us for a 190-token text: the largest host cost of tokenizing; bench/host.py)."""

    ids: list[int]
    encoding: Encoding

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Characters [first, last) covered by tokens [start, end) (end > start)."""
        return self.encoding.token_to_chars(start)[0], self.encoding.token_to_chars(end - 1)[1]

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """Every token's [first, last) characters (tests, tools: the service path uses `span`)."""
        return self.encoding.offsets


class TextTokenizer:
    """Thread-safe wrapper: `encode_batch` runs in Rust threads and releases the GIL."""

    def __init__(
        self, tok: Tokenizer, source: str = "<tokenizer>", hf_config: dict[str, Any] | None = None
    ) -> None:
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.source = source
        self.hf_config = hf_config or {}  # the tokenizer config applied over tokenizer.json (`from_file`)
        self.template = read_template(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """tokenizer.json, with what transformers applies over it from the tokenizer_config.json and
        special_tokens_map.json beside it."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: tokenizer.json is missing")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise CheckpointError(f"{path}: not a valid tokenizers file ({e})") from None
        return cls(tok, str(path), apply_hf_tokenizer_files(tok, path.parent))

    def encode_batch(self, texts: Sequence[str]) -> list[Tokens]:
        """Content ids (and spans on demand) per text, without special tokens."""
        if not texts:
            return []
        return [Tokens(e.ids, e) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
EXTRA_KEYS = ("additional_special_tokens", "extra_special_tokens")  # lists (or a name -> token mapping)
# transformers' own order of the named special tokens (new ones get ids in it); other `*_token` keys follow
STANDARD_SPECIALS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def apply_hf_tokenizer_files(tok: Tokenizer, directory: Path) -> dict[str, Any]:
    """What transformers' fast tokenizer applies over tokenizer.json from the tokenizer_config.json beside it
    (and from special_tokens_map.json, when the former has no `added_tokens_decoder`; the former wins a key
    both set), so our ids stay HF's. Added in this order: the tokens of `added_tokens_decoder` whose content
    or flags (lstrip, ...) tokenizer.json does not declare the same way (one that a `*_token` key names is
    special whatever it says); then the named special tokens (`cls_token`, `image_token`, ...) and the
    `additional_special_tokens`/`extra_special_tokens` that are not added tokens yet. A token already in the
    vocabulary keeps its id and takes the new flags, a new one gets the next id. `split_special_tokens: true`
    makes typed special tokens plain text. Returns the config it applied (`read_tokenizer_config`)."""
    config = read_tokenizer_config(directory)
    where = str(directory / "tokenizer_config.json")
    keys = [*STANDARD_SPECIALS, *(k for k in config if k.endswith("_token") and k not in STANDARD_SPECIALS)]
    named = [
        _added_token(config[key], f"{where}: {key}", special=True)
        for key in keys
        if isinstance(config.get(key), str | dict)
    ]
    extras = []
    for key in EXTRA_KEYS:
        value = config.get(key) or []
        values = list(value.values()) if isinstance(value, dict) else value
        if not isinstance(values, list):
            raise CheckpointError(f"{where}: {key} must be a list of tokens")
        extras += [_added_token(v, f"{where}: {key}", special=True) for v in values]

    have = tok.get_added_tokens_decoder().values()
    declared = {_key(t) for t in have}
    listed = {t.content for t in have}
    new: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{where}: added_tokens_decoder must be an object of id -> token")
    try:
        entries = sorted((int(k), v) for k, v in decoder.items())
    except ValueError:
        raise CheckpointError(f"{where}: added_tokens_decoder's keys must be token ids") from None
    special_names = {t.content for t in named}
    for index, entry in entries:
        token = _added_token(entry, f"{where}: added_tokens_decoder.{index}")
        if token.content in special_names:
            token.special = True
        if _key(token) not in declared:
            new.append(token)
            listed.add(token.content)
    for token in named + extras:
        if token.content not in listed:
            new.append(token)
            listed.add(token.content)
    if new:
        tok.add_tokens(new)
    if config.get("split_special_tokens"):
        tok.encode_special_tokens = True
    return config


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json beside tokenizer.json, over special_tokens_map.json when it has no
    `added_tokens_decoder` (transformers reads the legacy file only then); {} without either."""
    config: dict[str, Any] = {}
    if (directory / "tokenizer_config.json").exists():
        config = _read_object(directory / "tokenizer_config.json")
    legacy = directory / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.exists():
        config = {**_read_object(legacy), **config}
    return config


def special_token_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a tokenizer config that name special tokens or how they are split (not the added tokens
    themselves, which a saved tokenizer.json holds)."""
    keep = (*EXTRA_KEYS, "split_special_tokens")
    return {k: v for k, v in config.items() if k.endswith("_token") or k in keep}


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    return value


def _added_token(value: Any, where: str, special: bool | None = None) -> AddedToken:
    """An AddedToken from a string or a serialized {"content", flags...} object (`special` forced if
    given)."""
    if isinstance(value, str):
        return AddedToken(value, special=bool(special))
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise CheckpointError(f"{where}: must be a string or an object with a string 'content'")
    flags = {f: bool(value[f]) for f in ADDED_TOKEN_FLAGS if f in value}
    if special is not None:
        flags["special"] = special
    return AddedToken(value["content"], **flags)


def _key(token: AddedToken) -> tuple:
    return (token.content, *(getattr(token, f) for f in ADDED_TOKEN_FLAGS))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer with ModernBERT's specials and [CLS]/[SEP] templates."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok
