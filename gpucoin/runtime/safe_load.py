"""Loading checkpoint files that a worker wrote, without letting them run code.

A DeepSpeed checkpoint is a set of ``torch.save`` pickles, and a pickle can call any function on
load: whoever writes a checkpoint file could run code in every process that loads it (the
verifier, the co-workers resuming from it, the coordinator evaluating it). gpucoin therefore
loads every such file with ``torch.load(weights_only=True)``, whose unpickler builds only tensors,
plain containers and numbers, plus the three classes DeepSpeed 0.19's ZeRO 0/1/2 format needs
(``SAFE_GLOBALS``), and refuses anything else with ``UnsafeCheckpoint``:

- ``safe_torch_load``: one file;
- ``SafeCheckpointEngine``: DeepSpeed's checkpoint engine with that load, installed on a worker's
  engine (``install``) before it resumes, so every load of ``engine.load_checkpoint`` goes
  through it;
- tools that only take DeepSpeed's own loader (``zero_to_fp32``) get ``verified_copy``: a private
  read-only copy of the checkpoint, every file of which passed ``safe_torch_load`` (the files of
  the copy cannot change behind the check).
"""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpucoin.exceptions import VerificationError


class UnsafeCheckpoint(VerificationError):
    """A checkpoint file that is not a plain DeepSpeed checkpoint: it names code a weights-only
    load refuses to run (or is not a torch file at all). Its writer's failure, not the loader's."""


def safe_globals() -> list[Any]:
    """The classes a DeepSpeed ZeRO 0/1/2 checkpoint pickles besides tensors and plain data.

    Measured on DeepSpeed 0.19.8 (``tests/security/test_checkpoint_safety.py`` loads real ZeRO 0,
    1 and 2 checkpoints with exactly these): the fp16 ``LossScaler`` and the ``ZeroStageEnum`` of
    the optimizer state, and ``fragment_address`` of ``param_slice_mappings``. Unpickling them sets
    plain attributes; none of them is callable by the pickle.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a worker-written file that cannot run code.

    Raises:
        UnsafeCheckpoint: if the file asks for anything but tensors, plain data and ``safe_globals()``,
            or is no torch file.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(f"checkpoint file {path} was refused by a weights-only load: {first[:300]}") from None
    except OSError as exc:
        raise UnsafeCheckpoint(f"checkpoint file {path} cannot be read: {exc.strerror or exc}") from None


def _engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``safe_torch_load`` (saving unchanged)."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location="cpu" if map_location is None else map_location)

    return SafeCheckpointEngine


def install(engine: Any) -> None:
    """Make every checkpoint load of a DeepSpeed ``engine`` a weights-only load.

    DeepSpeed 0.19 routes ``load_checkpoint`` (model states, ZeRO optimizer states) through
    ``engine.checkpoint_engine.load``; this replaces that engine with one whose ``load`` is
    ``safe_torch_load``.
    """
    engine.checkpoint_engine = _engine_class()(getattr(engine, "_config", None))


@contextmanager
def verified_copy(tag_dir: str | Path) -> Iterator[Path]:
    """A private, read-only copy of a checkpoint tag directory, every file of which passed
    ``safe_torch_load``: what a tool that loads with plain pickle (DeepSpeed's ``zero_to_fp32``)
    may open. Yields the copy's parent directory, holding the tag directory under its own name
    (and a ``latest`` file naming it, as DeepSpeed writes); removed afterwards.

    Raises:
        UnsafeCheckpoint: if a file does not pass the safe load (nothing is handed out).
        VerificationError: if the directory holds no checkpoint file.
    """
    src = Path(tag_dir)
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else []
    if not files:
        raise VerificationError(f"no checkpoint files under {src}")
    with tempfile.TemporaryDirectory(prefix="gpucoin-ckpt-") as tmp:
        dst = Path(tmp) / src.name
        dst.mkdir()
        for f in files:
            copy = dst / f.name
            shutil.copyfile(f, copy)
            copy.chmod(stat.S_IRUSR)
            if copy.suffix == ".pt":
                safe_torch_load(copy)  # the copy is what gets loaded: checked after it can no longer change
        (Path(tmp) / "latest").write_text(src.name)
        try:
            yield Path(tmp)
        finally:
            for f in dst.iterdir():
                f.chmod(stat.S_IRUSR | stat.S_IWUSR)
