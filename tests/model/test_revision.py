"""The checkpoint revision (`Classifier.revision`, InfoResponse.model_revision): what it covers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from model import load_classifier
from model.classifier import REVISION_DIGITS, checkpoint_revision


def test_the_revision_follows_weights_config_and_tokenizer_not_thresholds(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    first = load_classifier(ckpt, device="cpu").revision
    assert len(first) == REVISION_DIGITS and int(first, 16) >= 0
    assert checkpoint_revision(ckpt, ["model.safetensors"]) == first  # the same files: the same revision

    (ckpt / "thresholds.json").write_text(json.dumps({"hate": 0.3}))  # thresholds travel in each response
    assert checkpoint_revision(ckpt, ["model.safetensors"]) == first

    tensors = load_file(ckpt / "model.safetensors")
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3  # one weight, a little: another model
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    retrained = load_classifier(ckpt, device="cpu").revision
    assert retrained != first

    config = json.loads((ckpt / "config.json").read_text())
    config["norm_eps"] = config.get("norm_eps", 1e-5) * 2
    (ckpt / "config.json").write_text(json.dumps(config))
    reconfigured = checkpoint_revision(ckpt, ["model.safetensors"])
    assert reconfigured not in (first, retrained)

    tok = ckpt / "tokenizer.json"
    tok.write_text(tok.read_text() + "\n")
    assert checkpoint_revision(ckpt, ["model.safetensors"]) not in (first, retrained, reconfigured)
