"""Long inputs: overlapping token windows, and the context cut. Pure list arithmetic, no torch.

Owns: how a text longer than the model's limit is split into windows of at most `size` content tokens that
overlap by exactly `overlap` tokens (the last window may be shorter), how many tokens those windows hold in
all (`window_tokens`), and how a response's context is cut from its start so its end — the part nearest the
response — is kept. Nothing is ever silently dropped: every content token lies in at least one window.
"""

from __future__ import annotations

# The most tokens a character can make: byte-level BPE (ModernBERT's tokenizer) starts from one token per
# UTF-8 byte and only merges, and a character takes at most 4 bytes (emoji, rare CJK): the bound behind
# `Classifier.most_tokens` and the worker's slice sizes (worker/slices.py, which must not import torch).
MAX_TOKENS_PER_CHAR = 4


def _check_window(size: int, overlap: int) -> None:
    if size <= 0:
        raise ValueError(f"window size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"window overlap must be in [0, {size}), got {overlap}")


def split_windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges covering range(n_tokens); consecutive windows share exactly `overlap`."""
    _check_window(size, overlap)
    if n_tokens <= size:
        return [(0, n_tokens)]
    stride = size - overlap
    windows = []
    start = 0
    while True:
        end = min(start + size, n_tokens)
        windows.append((start, end))
        if end == n_tokens:
            return windows
        start += stride


def window_tokens(n_tokens: int, size: int, overlap: int, extra: int) -> int:
    """Tokens in the windows `split_windows(n_tokens, size, overlap)` makes when each also carries `extra`
    tokens (special tokens, a context): every content token once, each overlap once more, `extra` per
    window. Arithmetic only (no list of windows)."""
    _check_window(size, overlap)
    windows = 1 if n_tokens <= size else 1 + -(-(n_tokens - size) // (size - overlap))
    return n_tokens + (windows - 1) * overlap + windows * extra


def keep_end(ids: list[int], limit: int) -> list[int]:
    """The last `limit` tokens of ids (a context is cut from its start)."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return ids[len(ids) - limit :] if len(ids) > limit else ids
