"""Ctrl-C during training: every Ray node started is stopped, unused escrow is refunded, the audit passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpucoin.cluster.embedded import free_port
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import escrow_account

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "shakespeare_char" / "job.yaml"
EXCERPT = REPO / "tests" / "data" / "shakespeare_excerpt.txt"

pytestmark = pytest.mark.ray


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


def test_ctrl_c_stops_the_cluster_and_refunds(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpucoin",
            "train",
            str(JOB),
            "--home",
            str(tmp_path),
            "--data",
            str(EXCERPT),
            "--steps",
            "400",
            "--interval",
            "4",
            "--head-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    seen = ""
    try:
        # wait until the first interval's receipts are in: the job is escrowed and training
        while "receipts signed" not in seen:
            assert proc.poll() is None, seen + proc.stderr.read()
            assert time.monotonic() < deadline, seen
            seen += proc.stderr.readline()
        assert _processes_mentioning(f"127.0.0.1:{port}"), "the local cluster should be running"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "error: interrupted" in err and "Traceback" not in err
    time.sleep(2)
    assert _processes_mentioning(f"127.0.0.1:{port}") == []
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as lg:
        assert lg.audit() == []
        orders = lg.messages("JobOrder")
        assert len(orders) == 1
        job_id = json.loads(orders[0].typed_data)["message"]["jobId"]
        assert lg.balance(escrow_account(job_id)) == 0
        assert any(t.code == "refund" for t in lg.transfers())
