"""The head never runs the submitter's code in its own process (no Ray here).

Preparing the corpus and the end-of-job evaluation import the job's package in a child process
(``coordinator.jobcode``); what the child answers is JSON checked against a closed schema, never
unpickled; a child that fails, hangs or lies is a ``JobCodeError`` and leaves no process behind.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from gpucoin.cluster.node_user import prepare_node_user, switching_users
from gpucoin.coordinator.jobcode import corpus_info, evaluate_in_child
from gpucoin.exceptions import JobCodeError
from gpucoin.spec import load_spec
from tests.conftest import EXCERPT, TINY_MODEL, write_spec


def _job(tmp_path: Path, hostile: str = "") -> tuple[Path, dict]:
    spec_path = write_spec(tmp_path / "job", TINY_MODEL)
    init = spec_path.parent / "__init__.py"
    init.write_text(init.read_text() + hostile)
    loaded = load_spec(spec_path)
    return loaded.module_dir.parent, loaded.spec.model_dump(mode="json")


SPY = """
import json as _json, os as _os
with open(_os.environ["SPY_OUT"], "w") as _f:
    _json.dump({"pid": _os.getpid(), "uid": _os.getuid(), "env": dict(_os.environ)}, _f)
"""


def test_corpus_is_prepared_in_a_child_without_gpucoin_variables(tmp_path, monkeypatch) -> None:
    spy = tmp_path / "spy.json"
    monkeypatch.setenv("SPY_OUT", str(spy))
    monkeypatch.setenv("GPUCOIN_PASSWORD_PROBE", "not-for-job-code")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-for-job-code-either")
    monkeypatch.setenv("GPUCOIN_CACHE_DIR", str(tmp_path / "cache"))
    parent, spec = _job(tmp_path, SPY)
    info = corpus_info(parent, spec, str(EXCERPT))
    assert info.vocab_size == len(set(EXCERPT.read_text(encoding="utf-8")))
    seen = json.loads(spy.read_text())
    assert seen["pid"] != os.getpid() and seen["uid"] == os.getuid()
    assert "GPUCOIN_PASSWORD_PROBE" not in seen["env"] and "RAY_AUTH_TOKEN" not in seen["env"]
    assert seen["env"]["GPUCOIN_CACHE_DIR"] == str(tmp_path / "cache")  # the workers' cache, shared on purpose


def test_an_error_in_job_code_is_one_clear_error(tmp_path) -> None:
    parent, spec = _job(tmp_path)
    with pytest.raises(JobCodeError, match="CorpusError: corpus source .* is neither 'pypi' nor an existing file"):
        corpus_info(parent, spec, str(tmp_path / "missing.txt"))


def test_an_answer_is_never_unpickled(tmp_path, monkeypatch) -> None:
    """Job code that replaces the child's answer with a pickle that would run code when loaded."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    monkeypatch.setenv("EVIL_ANSWER", pickle.dumps(Payload()).hex())
    hostile = """
import atexit as _atexit, os as _os, sys as _sys
def _swap():
    open(_sys.argv[1], "wb").write(bytes.fromhex(_os.environ["EVIL_ANSWER"]))
_atexit.register(_swap)
"""
    parent, spec = _job(tmp_path, hostile)
    with pytest.raises(JobCodeError, match="no answer"):
        corpus_info(parent, spec, str(EXCERPT))
    assert not marker.exists()


def test_an_answer_outside_the_schema_is_refused(tmp_path) -> None:
    hostile = """
_real = prepare_corpus
def prepare_corpus(*a, **k):
    c = _real(*a, **k)
    class Lie:
        vocab_size = -3
    return Lie()
"""
    parent, spec = _job(tmp_path, hostile)
    with pytest.raises(JobCodeError, match="vocab_size"):
        corpus_info(parent, spec, str(EXCERPT))


def test_hung_job_code_is_killed_with_what_it_started(tmp_path, monkeypatch) -> None:
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    hostile = """
import os as _os, subprocess as _sp, sys as _sys, time as _time
_p = _sp.Popen([_sys.executable, "-c", "import time; time.sleep(600)"])
open(_os.environ["PID_FILE"], "w").write(str(_p.pid))
_time.sleep(600)
"""
    parent, spec = _job(tmp_path, hostile)
    t0 = time.monotonic()
    with pytest.raises(JobCodeError, match="did not answer"):
        corpus_info(parent, spec, str(EXCERPT), timeout_s=5)
    assert time.monotonic() - t0 < 60
    grandchild = int(pid_file.read_text())
    gone = not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert gone, "a process the job's code started outlived it"


def test_the_untrained_model_is_evaluated_in_a_child(tmp_path, monkeypatch) -> None:
    spy = tmp_path / "spy.json"
    monkeypatch.setenv("SPY_OUT", str(spy))
    parent, spec = _job(tmp_path, SPY)
    ev = evaluate_in_child(parent, spec, str(EXCERPT), None, 0)
    vocab = len(set(EXCERPT.read_text(encoding="utf-8")))
    assert abs(ev.val_loss - math.log(vocab)) < 0.5  # an untrained model is near uniform
    assert 200 <= len(ev.sample) <= 400
    assert json.loads(spy.read_text())["pid"] != os.getpid()


@pytest.mark.skipif(not switching_users(), reason="only root runs job code as the node user")
def test_as_root_the_child_runs_as_the_node_user_on_copies(tmp_path, monkeypatch) -> None:
    """tmp_path is root's only: the child reads copies of the package (and of the checkpoint)."""
    user, _ = prepare_node_user()
    drop = Path(tempfile.mkdtemp(prefix="gpucoin-test-spy-", dir="/tmp"))
    os.chmod(drop, 0o1777)
    try:
        monkeypatch.setenv("SPY_OUT", str(drop / "spy.json"))
        parent, spec = _job(tmp_path, SPY)
        excerpt = drop / "excerpt.txt"
        excerpt.write_bytes(EXCERPT.read_bytes())
        os.chmod(excerpt, 0o644)
        info = corpus_info(parent, spec, str(excerpt), user=user)
        assert info.vocab_size == len(set(EXCERPT.read_text(encoding="utf-8")))
        seen = json.loads((drop / "spy.json").read_text())
        assert seen["uid"] == user.uid and seen["env"]["HOME"] == str(user.home)
        ev = evaluate_in_child(parent, spec, str(excerpt), None, 0, user=user)
        assert ev.val_loss > 0
    finally:
        shutil.rmtree(drop, ignore_errors=True)


@pytest.mark.skipif(not switching_users(), reason="only root runs job code as the node user")
def test_as_root_what_the_child_left_is_ended_and_nothing_else_of_the_node_user(tmp_path, monkeypatch) -> None:
    """A daemon the job's code leaves in a session of its own is ended with it; a process of the
    node user that the child did not start (a Ray node of this host, while the head evaluates a
    job) keeps running."""
    user, _ = prepare_node_user()
    drop = Path(tempfile.mkdtemp(prefix="gpucoin-test-daemon-", dir="/tmp"))
    os.chmod(drop, 0o1777)
    bystander = subprocess.Popen(
        ["sleep", "600"], cwd="/", env=user.env(), start_new_session=True, **user.popen_kwargs()
    )
    try:
        monkeypatch.setenv("PID_FILE", str(drop / "daemon.pid"))
        hostile = """
import os as _os, subprocess as _sp, sys as _sys
_p = _sp.Popen([_sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(_os.environ["PID_FILE"], "w").write(str(_p.pid))
"""
        parent, spec = _job(tmp_path, hostile)
        excerpt = drop / "excerpt.txt"
        excerpt.write_bytes(EXCERPT.read_bytes())
        os.chmod(excerpt, 0o644)
        corpus_info(parent, spec, str(excerpt), user=user)
        daemon = int((drop / "daemon.pid").read_text())
        gone = not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
        assert gone, "a daemon the job's code started outlived it"
        assert bystander.poll() is None, "a process of the node user the child did not start was ended"
    finally:
        bystander.kill()
        bystander.wait()
        shutil.rmtree(drop, ignore_errors=True)


@pytest.mark.skipif(not switching_users(), reason="only root stages the corpus for a node user")
def test_as_root_an_earlier_jobs_code_cannot_redirect_where_the_next_corpus_is_written(tmp_path) -> None:
    """A market held open runs several jobs; the code of an earlier one runs as the node user while
    the next job's corpus is staged by root. It can neither plant a link in the working dir nor
    move what was staged there: each job's corpus is made, filled and only then handed over, in a
    dir of its own under a dir of root's that the node user may only search."""
    from gpucoin.coordinator.job import NodeSetup, QuietUI

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("to be or not to be")
    second.write_text("that is the question")
    nodes = NodeSetup.prepare(QuietUI())
    try:
        user, work = nodes.user, nodes.work
        staged = Path(nodes.stage(str(first)))
        victim = tmp_path / "victim"
        victim.mkdir()
        hostile = (
            "import os, sys\n"
            "work, staged, victim = sys.argv[1:]\n"
            "failed = []\n"
            "for name in ('data-planted', 'n'):\n"
            "    try:\n"
            "        os.symlink(victim, os.path.join(work, name))\n"
            "    except OSError:\n"
            "        failed.append('link')\n"
            "try:\n"
            "    os.rename(os.path.dirname(staged), os.path.join(work, 'moved'))\n"
            "except OSError:\n"
            "    failed.append('rename')\n"
            "print(','.join(failed))\n"
        )
        p = subprocess.run(
            [sys.executable, "-c", hostile, str(work), str(staged), str(victim)],
            cwd="/",
            env=user.env(),
            capture_output=True,
            text=True,
            timeout=60,
            **user.popen_kwargs(),
        )
        assert p.returncode == 0 and p.stdout.strip() == "link,link,rename", p.stdout + p.stderr
        again = Path(nodes.stage(str(second)))
        assert again.parent != staged.parent and again.parent.parent == work == staged.parent.parent
        assert staged.read_text() == "to be or not to be" and again.read_text() == "that is the question"
        assert again.stat().st_uid == again.parent.stat().st_uid == user.uid
        assert work.stat().st_uid == 0 and oct(work.stat().st_mode & 0o777) == oct(0o711)
        assert list(victim.iterdir()) == []
    finally:
        nodes.close()
