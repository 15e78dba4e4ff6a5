"""DeepSpeed checkpoint tags: a checkpoint is named by the optimizer steps it was saved after.

What a checkpoint's files are and how receipts commit to them is ``gpucoin.storage``.
"""

from __future__ import annotations


def tag_for(step: int) -> str:
    """DeepSpeed checkpoint tag of the state before optimizer step ``step`` (after ``step`` steps)."""
    return f"step{step:08d}"
