"""nanoseek: DeepSeek-V3/R1 at a scale anyone can run.

    import nanoseek
    model, tokenizer = nanoseek.load("runs/pretrain")   # a checkpoint or run folder
    logits = model(input_ids)                            # [B, T] -> [B, T, vocab]
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, device: str = "cpu"):
    """(model, tokenizer) from a checkpoint folder, or a run folder's latest checkpoint.
    The model is in eval mode; the tokenizer is None if the folder has none."""
    from nanoseek.checkpoint import load_model

    model, tokenizer, _ = load_model(path, device)
    model.eval()
    return model, tokenizer
