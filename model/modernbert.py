"""ModernBERT for sequence classification, on packed (unpadded) token streams.

Owns: the network — embeddings + norm; N pre-norm layers (fused Wqkv, RoPE with a global and a local theta,
local ±window / global attention, GeGLU MLP); final norm; pooling per sequence; head (dense, act, norm) and
classifier. Module and parameter names equal Hugging Face's `ModernBertForSequenceClassification` state dict,
so loading is strict. A batch is one stream of T tokens described by a `Packed`; there is no padding
anywhere except inside the SDPA attention backend. Must not know: files, tokenizers, devices, batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import fused
from model.attention import Attention, AttentionContext
from model.config import ModernBertConfig
from model.packing import Packed


def activation(name: str):
    """HF's ACT2FN[name] for the names model.config.ACTIVATIONS accepts."""
    if name in ("gelu", "gelu_python"):
        return F.gelu  # exact erf GELU
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate"):
        return lambda x: F.gelu(x, approximate="tanh")  # the same tanh formula, written four ways in HF
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    if name == "relu6":
        return F.relu6
    if name in ("silu", "swish"):
        return F.silu
    if name == "mish":
        return F.mish
    if name == "tanh":
        return torch.tanh
    if name == "sigmoid":
        return torch.sigmoid
    if name == "linear":
        return lambda x: x
    raise ValueError(f"unsupported activation {name!r}")


# ---- RoPE (NeoX half rotation), pure helpers ------------------------------------------------------------


def rope_table(
    theta: float, head_dim: int, max_positions: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (max_positions, head_dim // 2) cos and sin of f = pos ⊗ 1/θ^(2i/d). HF's tables are cat(f, f):
    both halves of a head use the same angles, so half the table is all there is."""
    arange = lambda *a: torch.arange(*a, dtype=torch.float, device=device)  # noqa: E731
    inv_freq = 1.0 / (theta ** (arange(0, head_dim, 2) / head_dim))  # (D/2,)
    freqs = arange(max_positions)[:, None] * inv_freq[None, :]  # (P, D/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half rotation: with x = [x1, x2], out = [x1·cos − x2·sin, x2·cos + x1·sin] — HF's
    `x·cat(cos, cos) + rotate_half(x)·cat(sin, sin)` term for term. x: (..., T, H, D); cos, sin: (T, 1, D/2)
    fp32. Computed in fp32; eager inference writes one output buffer in four half-width passes (no
    concatenation); training (autograd) and compiled code use the plain expression (inductor fuses it)."""
    h = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    if x.requires_grad or torch.compiler.is_compiling():
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    out = torch.empty(xf.shape, dtype=torch.float32, device=x.device)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out.to(x.dtype)


# ---- modules ---------------------------------------------------------------------------------------------


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))  # (T, d)


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.local = not config.is_global(layer)
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.fused = False  # Wqkv + RoPE as one Triton kernel (model/fused.py); see fuse_epilogues

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, d) -> rotated q, k and v, each (T, H, D)."""
        if self.fused:
            qkv = fused.qkv_rope(x, self.Wqkv.weight, self.Wqkv.bias, *rope, self.n_heads)  # (3, T, H, D)
            return qkv[0], qkv[1], qkv[2]
        T = x.shape[0]
        qkv = self.Wqkv(x).view(T, 3, self.n_heads, self.head_dim)  # (T, 3, H, D)
        qk = apply_rope(qkv[:, :2].transpose(0, 1), *rope)  # q and k together: (2, T, H, D), contiguous
        return qk[0], qk[1], qkv[:, 2].contiguous()


class ModernBertMLP(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_activation)
        self.activation = config.hidden_activation
        self.fused = False  # Wi + GeGLU as one Triton kernel (model/fused.py); see fuse_epilogues

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.Wo(fused.geglu(x, self.Wi.weight, self.Wi.bias, self.activation))  # (T, I) -> (T, d)
        a, gate = self.Wi(x).chunk(2, dim=-1)  # first half is the activated input, second half the gate
        return self.Wo(self.act(a) * gate)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int) -> None:
        super().__init__()
        ln = lambda: nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)  # noqa: E731
        self.attn_norm = nn.Identity() if layer == 0 else ln()  # layer 0 has no attn_norm weights
        self.attn = ModernBertAttention(config, layer)
        self.mlp_norm = ln()
        self.mlp = ModernBertMLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: Attention, ctx: AttentionContext
    ) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        y = attn.attend(q, k, v, ctx, self.attn.local)  # (T, H, D)
        return self.residual(x, y)

    # The two attention-free halves of a layer: `torch.compile` regions when the runner compiles.
    def qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attn.project(self.attn_norm(x), rope)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.Wo(y.reshape(x.shape))  # (T, d)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(
            ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.reset_rope()

    def reset_rope(self, device: torch.device | str = "cpu") -> None:
        """(Re)build the fp32 RoPE tables on `device` (they are not in the checkpoint)."""
        c = self.config
        for name, theta in (("global", c.global_rope_theta), ("local", c.local_rope_theta)):
            cos, sin = rope_table(theta, c.head_dim, c.max_position_embeddings, device)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    def forward(self, batch: Packed, attn: Attention) -> torch.Tensor:
        """Packed batch -> last hidden state (T, d), i.e. HF's `last_hidden_state` at the real tokens."""
        if batch.max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {batch.max_seqlen} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        pos = batch.positions
        rope = {
            False: (self.global_cos[pos][:, None, :], self.global_sin[pos][:, None, :]),  # (T, 1, D/2)
            True: (self.local_cos[pos][:, None, :], self.local_sin[pos][:, None, :]),
        }
        ctx = attn.prepare(batch)
        x = self.embeddings(batch.input_ids)  # (T, d)
        for layer in self.layers:
            x = layer(x, rope[layer.attn.local], attn, ctx)
        return x  # final_norm is applied by the caller, after pooling when that saves work


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.act = activation(config.classifier_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class ModernBertForSequenceClassification(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def fuse_epilogues(self, on: bool = True) -> None:
        """Compute Wqkv + RoPE and Wi + GeGLU as fused Triton GEMMs (inference; the same weights, the same
        results up to rounding — the epilogues act on the fp32 accumulator). The caller checks
        `fused.unsupported` first; a compiled network must be compiled after this."""
        for layer in self.model.layers:
            layer.attn.fused = layer.mlp.fused = on

    def pool(self, x: torch.Tensor, batch: Packed) -> torch.Tensor:
        """(T, d) pre-final-norm hidden states -> (B, d) pooled, final-normed states."""
        norm = self.model.final_norm
        if self.config.classifier_pooling == "cls":
            return norm(x[batch.cu_seqlens[:-1].long()])  # the [CLS] token opens each sequence
        h = norm(x).float()
        sums = torch.zeros(batch.num_seqs, h.shape[1], dtype=h.dtype, device=h.device)
        sums.index_add_(0, batch.seq_index, h)  # (B, d)
        cu = batch.cu_seqlens
        lengths = (cu[1:] - cu[:-1]).to(h.dtype)[:, None]  # (B, 1), computed on device: no host sync
        return (sums / lengths).to(x.dtype)

    def forward(self, batch: Packed, attn: Attention) -> torch.Tensor:
        """Packed batch -> logits (B, num_labels)."""
        pooled = self.pool(self.model(batch, attn), batch)
        return self.classifier(self.head(pooled))
