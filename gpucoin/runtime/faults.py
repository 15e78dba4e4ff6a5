"""Fault injection for tests: a volunteer (or verifier) node started with one of these variables cheats.

The worker loop (``gpucoin.runtime.worker``) is the honest one; these hooks are the only
departures from it, each named after the attack it stands for, so the tests run the real
protocol against a real dishonest party.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

FAULT_SKIP_ENV = "GPUCOIN_TEST_FAULT_SKIP_SEQUENCES"
"""``N``: drop the last N sequences of every micro-batch (a volunteer that does less work than it
is paid for)."""

FAULT_CHECKPOINT_ENV = "GPUCOIN_TEST_FAULT_CHECKPOINT"
"""``<attack>@<step>``: at the checkpoint after ``step`` steps, sign honest sketches but
``withhold`` (name its files in the manifest, never store them: a rank that deletes its
checkpoint after signing), ``alter`` (store and sign weights other than it computed) or
``pickle`` (store and sign a file carrying a pickle payload) what it wrote."""

ATTACKS = ("withhold", "alter", "pickle")

FAULT_STALL_ENV = "GPUCOIN_TEST_FAULT_STALL"
"""``<seconds>@<step>``: sleep that long before handing in the receipt of the interval ending at
``step`` (a rank that stalls to be paid for more hours)."""

FAULT_FLOOD_ENV = "GPUCOIN_TEST_FAULT_FLOOD"
"""``N``: before each receipt, send the job's inbox N hostile submissions: its receipt under a
co-worker's rank, an oversized receipt, an oversized sketch, a bogus progress report (a rank that
floods the head to push its co-workers' receipts out)."""


FAULT_CHEAT_ENV = "GPUCOIN_CHEAT"
"""``<MODULE:NAME or shipped name>@<rank>``: the rank of that number cheats as the cheat object
says (``runtime.cheats``; ``gpucoin train --cheat`` sets it on the embedded mode's volunteers),
in the job's first attempt; ``...@*``: whatever rank this node holds, in every attempt (a node
that cheats, set on one node: what a group test must find)."""

FAULT_LAZY_VERIFIER_ENV = "GPUCOIN_TEST_FAULT_LAZY_VERIFIER"
"""``1`` on a verifier node: it signs every receipt it is asked about as passing without replaying
(the verifier's dilemma: a "pass" earns as much as a replay; ``verify.recheck`` is the defence)."""

FAULTS_BY_JOB_ENV = "GPUCOIN_TEST_FAULTS_BY_JOB"
"""JSON ``{job id prefix: {fault variable: value}}``: the faults above, each only in the jobs whose
id starts with that prefix (one node of a test's market cheats in one job and works honestly in
the others)."""

FAULT_VARS = (
    FAULT_SKIP_ENV,
    FAULT_CHECKPOINT_ENV,
    FAULT_STALL_ENV,
    FAULT_FLOOD_ENV,
    FAULT_CHEAT_ENV,
    FAULT_LAZY_VERIFIER_ENV,
)


def scope_to_job(job_id: str) -> None:
    """Set, in this rank's process, the faults ``FAULTS_BY_JOB_ENV`` names for ``job_id``.

    Raises:
        ValueError: a malformed variable.
    """
    import json

    raw = os.environ.get(FAULTS_BY_JOB_ENV, "")
    if not raw:
        return
    by_job = json.loads(raw)
    if not isinstance(by_job, dict) or not all(isinstance(v, dict) for v in by_job.values()):
        raise ValueError(f"{FAULTS_BY_JOB_ENV} must be a JSON object of objects, got {raw!r}")
    unknown = sorted({name for faults in by_job.values() for name in faults} - set(FAULT_VARS))
    if unknown:
        raise ValueError(
            f"{FAULTS_BY_JOB_ENV}: not fault variables: {', '.join(unknown)} (those are {', '.join(FAULT_VARS)})"
        )
    for prefix, faults in by_job.items():
        if job_id.startswith(prefix):
            os.environ.update({name: str(value) for name, value in faults.items()})


def lazy_verifier() -> bool:
    """Whether this verifier node signs without replaying (``FAULT_LAZY_VERIFIER_ENV``)."""
    return os.environ.get(FAULT_LAZY_VERIFIER_ENV, "") == "1"


def skipped_sequences() -> int:
    """Sequences to drop per micro-batch (0: honest)."""
    return int(os.environ.get(FAULT_SKIP_ENV, "0") or 0)


class SkipSequences:
    """The cheat of ``FAULT_SKIP_ENV``: drops the last ``n`` sequences of each micro-batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_batch(self, x, y, step: int, rank: int):
        return x[: -self.n], y[: -self.n]


def cheat_setting() -> tuple[str, int | None] | None:
    """``FAULT_CHEAT_ENV`` as (cheat reference, rank; None for ``*``, every rank), or None.

    Raises:
        ValueError: a malformed variable.
    """
    from gpucoin.runtime.cheats import check_ref

    value = os.environ.get(FAULT_CHEAT_ENV, "")
    if not value:
        return None
    ref, _, rank = value.rpartition("@")
    if not (rank.isdigit() or rank == "*"):
        raise ValueError(f"{FAULT_CHEAT_ENV} must be <MODULE:NAME>@<rank> or <MODULE:NAME>@*, got {value!r}")
    return check_ref(ref), None if rank == "*" else int(rank)


def rank_cheat(rank: int, spec, train, sketch, names, attempt: int = 0):
    """This rank's cheat (``runtime.cheats``), bound to its job, or None (honest): the one
    ``FAULT_CHEAT_ENV`` names if it names this rank and this is the job's first attempt (after a
    Rewind, a replacement volunteer trains the rank: the cheat stands for the node that was
    caught), else ``FAULT_SKIP_ENV``'s (set on one node: it cheats in every attempt).

    Args:
        spec: the ``JobSpec``; train: the train split; sketch: the job's ``CountSketch``;
        names: the model's parameter names in order.

    Raises:
        ValueError: a malformed variable or a cheat with no hooks. ImportError: no such module.
    """
    from gpucoin.runtime.cheats import CheatContext, load_cheat

    setting = cheat_setting()
    if setting is not None and (setting[1] is None or (setting[1] == rank and attempt == 0)):
        cheat = load_cheat(setting[0])
    elif skipped_sequences():
        cheat = SkipSequences(skipped_sequences())
    else:
        return None
    if callable(getattr(cheat, "bind", None)):
        cheat.bind(CheatContext(spec=spec, train=train, names=tuple(names), sketch=sketch.sketch_grads))
    return cheat


def checkpoint_attack(step: int) -> str | None:
    """The attack this node mounts on the checkpoint after ``step`` steps, or None.

    Raises:
        ValueError: for a malformed variable.
    """
    value = os.environ.get(FAULT_CHECKPOINT_ENV, "")
    if not value:
        return None
    attack, _, at = value.partition("@")
    if attack not in ATTACKS or not at.isdigit():
        raise ValueError(f"{FAULT_CHECKPOINT_ENV} must be <{'|'.join(ATTACKS)}>@<step>, got {value!r}")
    return attack if int(at) == step else None


class _Payload:
    """Unpickling this calls ``os.system`` (what a weights-only load refuses to do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def before_submit(step: int, channel, rank: int, receipt_json: str, sketches, losses: list[float]) -> None:
    """What this node does just before handing in its receipt for the interval ending at ``step``
    (``channel``: the head, ``runtime.channel.JobChannel``)."""
    import time

    import numpy as np

    flood = int(os.environ.get(FAULT_FLOOD_ENV, "0") or 0)
    for i in range(flood):
        kind = i % 4
        if kind == 0:
            _hostile(channel, "receipts", _submission(0 if rank else 1, receipt_json, sketches, losses))
        elif kind == 1:
            _hostile(channel, "receipts", _submission(rank, receipt_json + " " * 100_000, sketches, losses))
        elif kind == 2:
            big = np.zeros((sketches.shape[0], sketches.shape[1] * 64))
            _hostile(channel, "receipts", _submission(rank, receipt_json, big, losses))
        else:
            _hostile(channel, "progress", {"step": 10**9, "loss": 1e308, "lr": 0.0})
    value = os.environ.get(FAULT_STALL_ENV, "")
    if value:
        seconds, _, at = value.partition("@")
        if int(at) == step:
            time.sleep(float(seconds))


def _submission(rank: int, receipt_json: str, sketches, losses: list[float]) -> dict:
    return {"rank": rank, "receipt_json": receipt_json, "sketches": sketches.tolist(), "losses": list(losses)}


def _hostile(channel, what: str, body: dict) -> None:
    """POST ``body`` to the job's ``what`` endpoint as a hostile rank would: raw JSON, past every
    check gpucoin's client makes, and whatever the head answers (a refusal) ignored."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{channel.api_url}/v1/jobs/{channel.job_id}/{what}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - the head's http URL
            r.read()
    except (urllib.error.URLError, OSError):
        pass


def tamper(tag_dir: Path, attack: str) -> None:
    """Rewrite the files this rank wrote under ``tag_dir`` as ``attack`` says, before they are committed."""
    import torch

    for path in sorted(Path(tag_dir).iterdir()):
        if attack == "pickle":
            torch.save({"payload": _Payload(str(path.parent / "PWNED"))}, path)
        elif attack == "alter":
            state = torch.load(path, map_location="cpu", weights_only=False)  # its own file: no co-worker's
            _nudge(state)
            torch.save(state, path)


def _nudge(obj: object) -> None:
    """Add 1e-2 to every floating tensor in a nested state dict, in place."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.dim() > 0:
            obj.data.add_(1e-2)
    elif isinstance(obj, dict):
        for v in obj.values():
            _nudge(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _nudge(v)


def withholding(put: Callable[[bytes], str]) -> Callable[[bytes], str]:
    """A store ``put`` that stores the manifest (JSON) but not the checkpoint files (zip archives):
    their hashes are signed, their bytes never reach the store."""
    from gpucoin.storage.manifest import sha256_digest

    def put_(data: bytes) -> str:
        return put(data) if data[:1] == b"{" else sha256_digest(data)

    return put_
