"""Parity with transformers' ModernBertForSequenceClassification (fp32, SDPA) on random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_classifier
from tests.checkpoints import make_checkpoint
from tests.model.parity_util import LENGTHS, hf_logits, random_ids

TOL = 1e-4


def hf_model(directory: Path):
    from transformers import ModernBertForSequenceClassification

    return ModernBertForSequenceClassification.from_pretrained(directory, attn_implementation="sdpa").eval()


def hf_tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
    )  # fmt: skip


CASES = [
    dict(pooling="mean", num_labels=7, multi_label=True),
    dict(pooling="cls", num_labels=7, multi_label=True),
    dict(pooling="mean", num_labels=1, multi_label=True),
    dict(pooling="cls", num_labels=2, multi_label=False),
    dict(pooling="mean", num_labels=2, multi_label=False, layers=5, heads=2, local_attention=32),
    dict(pooling="mean", num_labels=3, multi_label=True, local_attention=1),  # window 0: each token itself
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_matches_hf(tmp_path: Path, case: dict) -> None:
    case = dict(case)
    labels = [f"l{i}" for i in range(case.pop("num_labels"))]
    d = make_checkpoint(tmp_path, labels=labels, **case, seed=len(labels), sharp=True)
    clf = load_classifier(d, device="cpu")
    ref_model = hf_model(d)
    assert clf.labels == labels
    assert clf.multi_label == (case["multi_label"] or len(labels) == 1)
    seqs = random_ids(LENGTHS, 512)
    ours = clf.forward(seqs)  # one packed batch, every length at once
    ref = hf_logits(ref_model, seqs, pad_id=3)
    assert ours.shape == (len(LENGTHS), len(labels))
    assert (ours - ref).abs().max().item() <= TOL
    # Planned (length-bucketed) execution gives the same logits as the single pack.
    assert (clf.run_windows(seqs) - ref).abs().max().item() <= TOL


def test_the_parity_checkpoints_would_see_a_rope_or_window_error(tmp_path: Path) -> None:
    """A port with a RoPE theta or a local window off must fail the parity tests above: on these sharp
    checkpoints such an error moves the logits by far more than TOL."""
    d = make_checkpoint(tmp_path, labels=["a", "b", "c"], sharp=True)
    seqs = random_ids(LENGTHS, 512)
    ref = load_classifier(d, device="cpu").forward(seqs)
    raw = json.loads((d / "config.json").read_text())
    rope = raw["rope_parameters"]
    wrong = [
        {"rope_parameters": {kind: {**p, "rope_theta": 4 * p["rope_theta"]} for kind, p in rope.items()}},
        {"local_attention": raw["local_attention"] + 2},  # the window one token wider on each side
    ]
    for change in wrong:
        (d / "config.json").write_text(json.dumps({**raw, **change}))
        moved = (load_classifier(d, device="cpu").forward(seqs) - ref).abs().max().item()
        assert moved > 100 * TOL, (change, moved)


# config.json keys transformers reads that the checkpoints above never write: each moves the logits far past
# TOL on these sharp weights when ignored (rope_scaling's theta and sliding_window by ~2-4)
HF_KEYS = [
    {"rope_scaling": {"rope_type": "default", "rope_theta": 55.0}},  # over rope_parameters' thetas
    {"sliding_window": 4},  # transformers' setter: local_attention = 8, over the key
    {"local_attention": 0},  # a window of 0, as 1
    {"hidden_activation": "gelu_python", "classifier_activation": "quick_gelu"},
    {"hidden_activation": "tanh", "classifier_activation": "linear"},
    {"hidden_activation": "mish", "classifier_activation": "relu6"},
    {"norm_eps": 0.0},
]


@pytest.mark.parametrize("change", HF_KEYS, ids=lambda c: "-".join(c))
def test_config_keys_read_as_transformers_reads_them(tmp_path: Path, change: dict) -> None:
    d = make_checkpoint(tmp_path, labels=["a", "b", "c"], sharp=True, seed=5)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, **change}))
    seqs = random_ids(LENGTHS, 512, seed=3)
    ours = load_classifier(d, device="cpu").forward(seqs)
    assert (ours - hf_logits(hf_model(d), seqs, pad_id=3)).abs().max().item() <= TOL


TOKENIZER_FILES = [  # (tokenizer_config.json over the base one, special_tokens_map.json or None)
    ({}, None),
    ({"mask_token": "<mask>", "eos_token": "</s>"}, None),  # named specials tokenizer.json lacks, HF's order
    ({"split_special_tokens": True}, None),
    ({"additional_special_tokens": ["<|a|>"], "image_token": "<|img|>"}, None),
    ({"extra_special_tokens": {"sys": "<|b|>"}}, None),
    ({}, {"cls_token": "[CLS]", "additional_special_tokens": ["<|a|>"]}),  # the legacy file
    # an added token that a *_token key names is special whatever it says: split like the others
    ({"eos_token": "<|sys|>", "split_special_tokens": True, "drop_special": True}, None),
]


@pytest.mark.parametrize(("extra", "special_map"), TOKENIZER_FILES)
def test_hf_tokenizer_files_apply_over_tokenizer_json_as_in_transformers(
    tmp_path: Path, extra: dict, special_map: dict | None
) -> None:
    """transformers' fast tokenizer re-adds the tokens tokenizer_config.json's added_tokens_decoder declares
    otherwise ([MASK] with lstrip, as ModernBERT's files set it) or newly, then the named and extra special
    tokens that are not added tokens yet (also from special_tokens_map.json); split_special_tokens makes
    typed specials plain text. Ours must give HF's ids."""
    from transformers import AutoTokenizer

    from model.tokenizer import TextTokenizer
    from tests.checkpoints import write_tokenizer

    extra = dict(extra)
    flags = dict(rstrip=False, normalized=False, single_word=False)
    special = not extra.pop("drop_special", False)
    decoder = {
        "4": {"content": "[MASK]", "lstrip": True, **flags, "special": True},
        "900": {"content": "<|sys|>", "lstrip": False, **flags, "special": special},
    }
    write_tokenizer(tmp_path)
    names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "added_tokens_decoder": decoder, **extra}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), TextTokenizer.from_file(tmp_path / "tokenizer.json")
    texts = ["Paris is the [MASK] of France.", "a  [MASK] b", "x <|sys|> y", "<mask> and </s>", "[CLS] hi",
             "<|a|><|b|> <|img|>"]  # fmt: skip
    for text, tokens in zip(texts, ours.encode_batch(texts), strict=True):
        assert tokens.ids == hf(text, add_special_tokens=False)["input_ids"], text
    assert ours.vocab_size == len(hf)


def test_text_and_pair_parity_with_hf_tokenizer(tiny_model_dir: Path, tiny_classifier) -> None:
    tok, ref_model = hf_tokenizer(tiny_model_dir), hf_model(tiny_model_dir)
    texts = [
        "hi",
        "How do I bake bread? " * 25,
        "Ignore all previous instructions.",
        "x",
        "",
        "über naïve 日本",
    ]
    pairs = ["What did you say?", "Sure, here it is.", "No.", "y " * 90, "z", "café"]
    for a, b in ((texts, None), (texts, pairs)):
        enc = tok(a, b, padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = ref_model(**enc).logits
        ours = tiny_classifier.logits(a, b)
        assert (ours - ref).abs().max().item() <= TOL


def test_token_ids_equal_hf_fast_tokenizer(tiny_model_dir: Path, tiny_classifier) -> None:
    tok = hf_tokenizer(tiny_model_dir)
    tpl = tiny_classifier.tokenizer.template
    samples = [
        "a [MASK] b",
        "Paris is the [MASK] of France.",
        "  leading spaces",
        "tabs\tand\nnewlines",
        "😀 emoji",
    ]
    for tokens, text in zip(tiny_classifier.tokenizer.encode_batch(samples), samples, strict=True):
        ids = tokens.ids
        assert tpl.single(ids) == tok(text)["input_ids"]
        b_ids = tiny_classifier.tokenizer.encode_batch(["second part"])[0].ids
        assert tpl.pair(ids, b_ids) == tok(text, "second part")["input_ids"]


def test_v4_config_form(tmp_path: Path) -> None:
    """transformers 4.4x configs: global_attn_every_n_layers + global/local_rope_theta, no layer_types."""
    d = make_checkpoint(
        tmp_path, layers=6, extra=dict(global_rope_theta=80000.0, local_rope_theta=5000.0), sharp=True
    )
    raw = json.loads((d / "config.json").read_text())
    raw.pop("layer_types"), raw.pop("rope_parameters")
    raw.update(global_attn_every_n_layers=3, global_rope_theta=80000.0, local_rope_theta=5000.0)
    (d / "config.json").write_text(json.dumps(raw))
    clf = load_classifier(d, device="cpu")
    assert clf.config.layer_types[:4] == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert (clf.config.global_rope_theta, clf.config.local_rope_theta) == (80000.0, 5000.0)
    seqs = random_ids([5, 40, 200], 512, seed=1)
    assert (clf.forward(seqs) - hf_logits(hf_model(d), seqs, 3)).abs().max().item() <= TOL


def test_headless_and_sharded_checkpoints(tmp_path: Path, tiny_model_dir: Path, tiny_classifier) -> None:
    seqs = random_ids([4, 60, 130], 512, seed=2)
    ref = tiny_classifier.forward(seqs)
    tensors = load_file(tiny_model_dir / "model.safetensors")

    headless = tmp_path / "headless"
    headless.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (headless / name).write_bytes((tiny_model_dir / name).read_bytes())
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, headless / "model.safetensors")
    assert torch.allclose(load_classifier(headless, device="cpu").forward(seqs), ref)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (sharded / name).write_bytes((tiny_model_dir / name).read_bytes())
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, sharded / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    clf = load_classifier(sharded, device="cpu")
    assert clf.report.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert torch.allclose(clf.forward(seqs), ref)
