"""ModernBERT configuration: one dataclass, read from a Hugging Face `config.json`.

Owns: the hyper-parameters of the network and of the classification head, and their validation. Accepts
both the transformers 4.4x form (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) and
the 5.x form (`layer_types`, `rope_parameters`). Must not know: weights, tokenizers, devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import ConfigError

ACTIVATIONS = (
    "gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "quick_gelu",
    "relu", "relu6", "silu", "swish", "mish", "tanh", "sigmoid", "linear",
)  # fmt: skip
# regression heads give unbounded values, not probabilities a threshold in [0, 1] could judge: refused
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152  # Wi projects to 2 * intermediate_size (input half, gate half)
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    local_attention: int = 128  # total window; a query sees keys with |i - j| <= local_attention // 2
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False  # bias of head.dense (the classifier Linear always has one)
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    classifier_pooling: str = (
        "cls"  # HF class default; released checkpoints say "mean" — always read the file
    )
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    name: str = "modernbert"  # `_name_or_path` or the directory name; reported, never used for logic
    source: str = "<config>"  # the file this came from, for error messages

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(why, field=name, file=self.source)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "local_attention"):  # fmt: skip
            value = getattr(self, name)
            least = 0 if name == "local_attention" else 1  # 0 and 1 both mean a window of 0 (itself only)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise bad(name, f"must be an integer >= {least}, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise bad("num_attention_heads", f"must divide hidden_size {self.hidden_size}")
        if self.head_dim % 2:
            raise bad("num_attention_heads", f"head_dim {self.head_dim} must be even for RoPE")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad(
                "layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                raise bad("layer_types", f"unknown layer type {t!r}; expected one of {LAYER_TYPES}")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise bad(name, f"unsupported activation {getattr(self, name)!r}; supported: {ACTIVATIONS}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise bad("classifier_pooling", f"must be 'cls' or 'mean', got {self.classifier_pooling!r}")
        if self.problem_type == "regression":
            raise bad(
                "problem_type",
                "'regression' heads give unbounded values, not probabilities that per-label thresholds in "
                "[0, 1] could judge; use single_label_classification or multi_label_classification",
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise bad("problem_type", f"must be one of {PROBLEM_TYPES} or null, got {self.problem_type!r}")
        if not self.id2label or sorted(self.id2label) != list(range(len(self.id2label))):
            raise bad("id2label", "must map 0..n-1 to label names")
        if len(set(self.id2label.values())) != len(self.id2label):
            raise bad("id2label", "label names must be unique")
        for name in ("global_rope_theta", "local_rope_theta", "norm_eps"):
            value = getattr(self, name)
            least_ok = value >= 0 if name == "norm_eps" else value > 0  # LayerNorm takes eps 0, as HF does
            if not isinstance(value, int | float) or isinstance(value, bool) or not least_ok:
                kind = "a non-negative" if name == "norm_eps" else "a positive"
                raise bad(name, f"must be {kind} number, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window(self) -> int:
        """Half-width of the local attention window: keys with |i - j| <= window are visible."""
        return self.local_attention // 2

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    @property
    def multi_label(self) -> bool:
        """Sigmoid per label (multi-label or a single logit) versus softmax across labels."""
        return self.problem_type == "multi_label_classification" or self.num_labels == 1

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> ModernBertConfig:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(why, field=name, file=source)

        if raw.get("model_type", "modernbert") != "modernbert":
            raise bad("model_type", f"expected 'modernbert', got {raw.get('model_type')!r}")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        for name in required:
            if name not in raw:
                raise bad(name, "is missing")
        n_layers = raw["num_hidden_layers"]

        layer_types = raw.get("layer_types")
        if layer_types is None:
            every = raw.get("global_attn_every_n_layers", 3)
            if not isinstance(every, int) or every <= 0:
                raise bad("global_attn_every_n_layers", f"must be a positive integer, got {every!r}")
            if not isinstance(n_layers, int):
                raise bad("num_hidden_layers", f"must be a positive integer, got {n_layers!r}")
            layer_types = [
                "full_attention" if i % every == 0 else "sliding_attention" for i in range(n_layers)
            ]
        elif not isinstance(layer_types, list):
            raise bad("layer_types", f"must be a list, got {type(layer_types).__name__}")

        global_theta = raw.get("global_rope_theta", 160_000.0)
        local_theta = raw.get("local_rope_theta", 10_000.0)
        # the pre-5.x key, which transformers still merges into every layer type's parameters, over
        # rope_parameters' own: its rope_theta (if any) is both layers' theta
        legacy = raw.get("rope_scaling")
        if legacy is not None:
            if not isinstance(legacy, dict):
                raise bad("rope_scaling", "must be an object or null")
            kind = legacy.get("rope_type", legacy.get("type", "default"))
            if kind != "default":
                raise bad("rope_scaling.rope_type", f"only 'default' RoPE is supported, got {kind!r}")
        rope = raw.get("rope_parameters")
        if rope is not None:
            if not isinstance(rope, dict):
                raise bad("rope_parameters", "must be an object keyed by layer type")
            for key in rope:
                if key not in LAYER_TYPES:
                    raise bad("rope_parameters", f"unknown layer type {key!r}")
                kind = (rope[key] or {}).get("rope_type", "default")
                if kind != "default":
                    raise bad(
                        f"rope_parameters.{key}.rope_type", f"only 'default' RoPE is supported, got {kind!r}"
                    )
            global_theta = (rope.get("full_attention") or {}).get("rope_theta", global_theta)
            local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", local_theta)
        if legacy is not None and "rope_theta" in legacy:
            global_theta = local_theta = legacy["rope_theta"]

        if "id2label" in raw:
            try:
                id2label = {int(k): str(v) for k, v in raw["id2label"].items()}
            except (AttributeError, ValueError) as e:
                raise bad("id2label", f"must map integer ids to names ({e})") from None
            n = raw.get("num_labels")
            if n is not None and n != len(id2label):
                raise bad("num_labels", f"is {n!r}, but id2label names {len(id2label)} labels")
        else:
            n = raw.get("num_labels", 2)
            if not isinstance(n, int) or n <= 0:
                raise bad("num_labels", f"must be a positive integer, got {n!r}")
            id2label = {i: f"LABEL_{i}" for i in range(n)}

        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "local_attention", "max_position_embeddings", "norm_eps", "norm_bias", "attention_bias",
            "mlp_bias", "classifier_bias", "hidden_activation", "classifier_activation",
            "classifier_pooling", "problem_type",
        }  # fmt: skip
        kwargs = {k: raw[k] for k in known if k in raw}
        window = raw.get("sliding_window")  # transformers' setter: local_attention = 2 × it, over the key
        if window is not None:
            if not isinstance(window, int) or isinstance(window, bool) or window < 0:
                raise bad("sliding_window", f"must be an integer >= 0, got {window!r}")
            kwargs["local_attention"] = 2 * window
        head_dim = raw.get("head_dim")  # transformers derives it; one that disagrees is a broken file
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        derived = (
            hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
        )
        if head_dim is not None and derived is not None and head_dim != derived:
            raise bad("head_dim", f"is {head_dim!r}, but hidden_size / num_attention_heads = {derived}")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
            if raw.get(name) is not None:
                kwargs[name] = raw[name]
        name = raw.get("_name_or_path") or Path(source).parent.name or "modernbert"
        return cls(
            **kwargs,
            layer_types=list(layer_types),
            global_rope_theta=float(global_theta),
            local_rope_theta=float(local_theta),
            id2label=id2label,
            name=str(name),
            source=source,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModernBertConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("file not found", field="<file>", file=str(path)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"not valid JSON ({e})", field="<file>", file=str(path)) from None
        if not isinstance(raw, dict):
            raise ConfigError("must be a JSON object", field="<file>", file=str(path))
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json written by `safety train`: loadable by transformers' ModernBertConfig."""
        return {
            "architectures": ["ModernBertForSequenceClassification"],
            "model_type": "modernbert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "layer_types": self.layer_types,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
            },
            "local_attention": self.local_attention,
            "max_position_embeddings": self.max_position_embeddings,
            "norm_eps": self.norm_eps,
            "norm_bias": self.norm_bias,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "classifier_bias": self.classifier_bias,
            "hidden_activation": self.hidden_activation,
            "classifier_activation": self.classifier_activation,
            "classifier_pooling": self.classifier_pooling,
            "pad_token_id": self.pad_token_id,
            "cls_token_id": self.cls_token_id,
            "sep_token_id": self.sep_token_id,
            "bos_token_id": self.cls_token_id,
            "eos_token_id": self.sep_token_id,
            "id2label": {str(i): n for i, n in self.id2label.items()},
            "label2id": {n: i for i, n in self.id2label.items()},
            "problem_type": self.problem_type,
        }
