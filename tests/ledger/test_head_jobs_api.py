"""The head API's job endpoints over a real ledger (SQLite and PostgreSQL): a submitter uploads a
package and queues a signed JobOrder (escrowed in the same request), and the ranks' endpoints
screen what they are handed. Ray is not involved: the scheduler that places jobs is tested
against a real cluster in tests/integration/test_join.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gpucoin.coordinator.settle import Coordinator
from gpucoin.head.api import make_app
from gpucoin.head.jobs import JobBoard, JobTable, RunningJob
from gpucoin.head.packages import pack
from gpucoin.head.records import JobLaunch, JobState
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import escrow_account, wallet_account
from gpucoin.runtime.inbox import InboxConfig, JobInbox
from gpucoin.spec import load_spec
from gpucoin.storage import ContentStore
from gpucoin.storage.manifest import sha256_digest
from gpucoin.wallet.messages import sign
from tests.conftest import TINY_MODEL, write_spec
from tests.ledger.helpers import CONSUMER, COORDINATOR, DOMAIN, GPC, WORKER
from tests.ledger.test_head_api import service_config


@pytest.fixture
def head(ledger: Ledger, tmp_path):
    cfg = service_config(tmp_path / "head")
    board = JobBoard(cfg.home / "jobs")
    coord = Coordinator(ledger, ledger.policy, COORDINATOR, DOMAIN)
    client = TestClient(make_app(ledger, cfg, coord, lambda: {}, board))
    r = client.post(
        "/v1/faucet", json={"recipient": CONSUMER.address, "amount_ugpc": 100 * GPC, "request_id": "fund-consumer"}
    )
    assert r.status_code == 200, r.text
    loaded = load_spec(write_spec(tmp_path / "job", TINY_MODEL))
    return client, board, loaded


def _order(loaded, job_id: str = "job-1", nonce: int = 1, **changes) -> dict:
    spec = loaded.spec
    message = {
        "consumer": CONSUMER.address,
        "jobId": job_id,
        "specHash": loaded.spec_hash,
        "packageHash": loaded.package_hash,
        "workers": spec.workers,
        "bidPerWorkerHour": spec.bid_ugpc_per_worker_hour,
        "budget": spec.budget_ugpc,
        "nonce": nonce,
        "deadline": int(time.time()) + 600,
    }
    message.update(changes)
    return json.loads(sign(CONSUMER, "JobOrder", DOMAIN, message).to_json())


def _upload(client, loaded) -> None:
    r = client.put(f"/v1/packages/{loaded.package_hash}", content=pack(loaded.module_dir))
    assert r.status_code == 200, r.text


def test_a_signed_order_is_escrowed_and_queued_once(head, ledger: Ledger) -> None:
    client, board, loaded = head
    _upload(client, loaded)
    order = _order(loaded)
    body = {"order": order, "spec": loaded.spec.model_dump(mode="json")}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["job_id"] == "job-1" and view["state"] == "queued" and view["consumer"] == CONSUMER.address
    assert ledger.balance(escrow_account("job-1")) == loaded.spec.budget_ugpc
    assert board.wake.is_set()  # a round starts at once
    again = client.post("/v1/jobs", json=body)  # a retry: nothing twice
    assert again.status_code == 200 and ledger.balance(escrow_account("job-1")) == loaded.spec.budget_ugpc
    other = client.post("/v1/jobs", json={**body, "order": _order(loaded, nonce=2)})
    assert other.status_code == 409, other.text
    assert [j["job_id"] for j in client.get("/v1/jobs").json()] == ["job-1"]
    assert "queued" in client.get("/v1/jobs/job-1/events").json()[0]["text"]
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {s.labels["state"]: s.value for s in families["gpucoin_jobs"].samples}["queued"] == 1
    assert "gpucoin_market_clearing_seconds" in families and "gpucoin_job_samples_per_second" in families
    assert ledger.audit() == []


@pytest.mark.parametrize(
    "change, upload, status, detail",
    [
        ({"specHash": "0x" + "00" * 32}, True, 400, "the order signed specHash"),
        ({"budget": 7}, True, 400, "budget"),
        ({}, False, 400, "no package"),
        ({"jobId": "../../etc"}, True, 400, "job id"),
        ({"budget": 10_000 * GPC}, True, 400, "budget"),
    ],
    ids=["spec-hash", "budget-not-the-spec's", "no-package", "path-in-job-id", "budget-above-balance"],
)
def test_an_order_the_head_must_not_take_changes_nothing(head, ledger: Ledger, change, upload, status, detail) -> None:
    client, _, loaded = head
    if upload:
        _upload(client, loaded)
    before = (ledger.balances(), len(ledger.messages()))
    r = client.post("/v1/jobs", json={"order": _order(loaded, **change), "spec": loaded.spec.model_dump(mode="json")})
    assert r.status_code == status and detail in r.json()["detail"], r.text
    assert (ledger.balances(), len(ledger.messages())) == before
    assert client.get("/v1/jobs").json() == []


def test_a_spec_that_asks_more_than_the_balance_is_refused_by_the_ledger(head, ledger: Ledger, tmp_path) -> None:
    client, _, _ = head
    loaded = load_spec(write_spec(tmp_path / "big", {**TINY_MODEL, 'budget_gpc: "5"': 'budget_gpc: "5000"'}))
    _upload(client, loaded)
    r = client.post("/v1/jobs", json={"order": _order(loaded), "spec": loaded.spec.model_dump(mode="json")})
    assert r.status_code == 409 and "exceeds" in r.json()["detail"], r.text
    assert ledger.balance(wallet_account(CONSUMER.address)) == 100 * GPC


def test_rank_endpoints_of_a_job_that_does_not_run_are_404(head) -> None:
    client, _, _ = head
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.get("/v1/jobs/nope/stop").status_code == 404
    assert client.put("/v1/jobs/nope/objects", content=b"x").status_code == 404
    assert client.get("/v1/jobs/nope/replays/0-1").status_code == 404


def test_the_ranks_endpoints_screen_what_they_are_handed(head, tmp_path) -> None:
    client, board, loaded = head
    inbox = JobInbox(InboxConfig("job-2", DOMAIN.as_dict(), (WORKER.address,), 4, 8, 8))
    store = ContentStore(tmp_path / "store")
    launch = JobLaunch(
        job_id="job-2", spec={}, node_ids=["n"], assignments=[], buckets=8, data_source="x", api_url="http://h"
    )
    board.add_running("job-2", RunningJob(inbox=inbox, store=store, launch=launch))
    assert client.get("/v1/jobs/job-2/launch").json()["node_ids"] == ["n"]
    assert client.get("/v1/jobs/job-2/stop").json() == {"reason": None}
    put = client.put("/v1/jobs/job-2/objects", content=b"weights")
    assert put.status_code == 200 and put.json()["digest"] == sha256_digest(b"weights")
    assert client.get(f"/v1/jobs/job-2/objects/{sha256_digest(b'weights')}").content == b"weights"
    has = client.post("/v1/jobs/job-2/objects/has", json={"digests": [sha256_digest(b"weights"), "0x" + "00" * 32]})
    assert has.json() == {"present": [True, False]}
    # a missing object is 410, not 404 (no such job): the verifier pins it on the rank that signed it
    assert client.get(f"/v1/jobs/job-2/objects/0x{'00' * 32}").status_code == 410
    # a receipt nobody signed, for a rank that does not exist, or with a ragged sketch: refused, nothing kept
    forged = {"rank": 0, "receipt_json": "{}", "sketches": [[0.0] * 8], "losses": [1.0]}
    assert client.post("/v1/jobs/job-2/receipts", json=forged).json()["accepted"] is False
    assert client.post("/v1/jobs/job-2/receipts", json={**forged, "rank": 5}).json()["accepted"] is False
    ragged = {**forged, "sketches": [[0.0] * 8, [0.0] * 7], "losses": [1.0, 1.0]}
    assert client.post("/v1/jobs/job-2/receipts", json=ragged).json()["accepted"] is False
    assert client.post("/v1/jobs/job-2/receipts", json={**forged, "receipt_json": "x" * 9000}).status_code == 422
    assert inbox.poll() == [] and inbox.refused == 2
    # progress is display only, and a nonsense one is dropped
    client.post("/v1/jobs/job-2/progress", json={"step": 3, "loss": 2.5, "lr": 0.001})
    client.post("/v1/jobs/job-2/progress", json={"step": 10**9, "loss": 1.0, "lr": 0.0})
    (ev,) = inbox.poll()
    assert ev.step == 3 and ev.loss == 2.5
    inbox.stop("a proven fraud")
    assert client.get("/v1/jobs/job-2/stop").json() == {"reason": "a proven fraud"}


def _cancel(job_id: str, who=CONSUMER, nonce: int = 50) -> dict:
    return sign(who, "JobCancel", DOMAIN, {"consumer": who.address, "jobId": job_id, "nonce": nonce}).to_dict()


def test_a_queued_job_cancelled_by_its_consumer_is_refunded_once(head, ledger: Ledger) -> None:
    client, board, loaded = head
    _upload(client, loaded)
    client.post("/v1/jobs", json={"order": _order(loaded), "spec": loaded.spec.model_dump(mode="json")})
    stranger = client.post("/v1/jobs/job-1/cancel", json={"message": _cancel("job-1", WORKER)})
    assert stranger.status_code == 403 and ledger.balance(escrow_account("job-1")) == loaded.spec.budget_ugpc
    other_job = client.post("/v1/jobs/job-1/cancel", json={"message": _cancel("job-2")})
    assert other_job.status_code == 400
    r = client.post("/v1/jobs/job-1/cancel", json={"message": _cancel("job-1")})
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert ledger.balance(escrow_account("job-1")) == 0
    assert ledger.balance(wallet_account(CONSUMER.address)) == 100 * GPC
    again = client.post("/v1/jobs/job-1/cancel", json={"message": _cancel("job-1", nonce=51)})
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert ledger.balance(wallet_account(CONSUMER.address)) == 100 * GPC and ledger.audit() == []


def test_a_running_job_cancelled_is_told_to_stop_at_its_next_boundary(head, ledger: Ledger, tmp_path) -> None:
    client, board, loaded = head
    _upload(client, loaded)
    client.post("/v1/jobs", json={"order": _order(loaded), "spec": loaded.spec.model_dump(mode="json")})
    JobTable(ledger.engine).update("job-1", state=JobState.RUNNING)  # as the market round leaves it
    inbox = JobInbox(InboxConfig("job-1", DOMAIN.as_dict(), (WORKER.address,), 4, 8, 8))
    launch = JobLaunch(job_id="job-1", spec={}, node_ids=["n"], assignments=[], buckets=8, data_source="x", api_url="h")
    board.add_running("job-1", RunningJob(inbox=inbox, store=ContentStore(tmp_path / "s"), launch=launch))
    r = client.post("/v1/jobs/job-1/cancel", json={"message": _cancel("job-1")})
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert client.get("/v1/jobs/job-1/stop").json() == {"reason": "cancelled by its consumer"}
    assert board.running("job-1").cancelled  # the runner settles what was verified, then refunds
    assert ledger.balance(escrow_account("job-1")) == loaded.spec.budget_ugpc


def test_only_the_verifier_answers_a_replay(head, tmp_path) -> None:
    """Anyone reaching the API may post a replay's answer: a forged one (another signer, another
    verifier named, no report) is refused and leaves the slot to the verifier's own."""
    from gpucoin.head.jobs import Replay
    from tests.ledger.helpers import VERIFIER

    client, board, _ = head
    inbox = JobInbox(InboxConfig("job-3", DOMAIN.as_dict(), (WORKER.address,), 4, 8, 8))
    launch = JobLaunch(job_id="job-3", spec={}, node_ids=["n"], assignments=[], buckets=8, data_source="x", api_url="h")
    board.add_running("job-3", RunningJob(inbox=inbox, store=ContentStore(tmp_path / "s"), launch=launch))
    board.running("job-3").replays["0-1"] = Replay(request={"step_start": 0}, verifier=VERIFIER.address)
    assert client.get("/v1/jobs/job-3/replays/0-1").json() == {"step_start": 0}

    def report(who) -> str:
        msg = {
            "verifier": who.address,
            "receiptDigest": "0x" + "11" * 32,
            "verdict": "fail",
            "distanceE9": 10**9,
            "nonce": 3,
        }
        return sign(who, "VerificationReport", DOMAIN, msg).to_json()

    forged = [
        {"verifier": WORKER.address, "reports": [report(WORKER)], "findings": []},  # another verifier named
        {"verifier": VERIFIER.address, "reports": [report(WORKER)], "findings": []},  # signed by another key
        {"verifier": VERIFIER.address, "reports": [], "findings": []},  # nothing signed at all
    ]
    for body in forged:
        r = client.post("/v1/jobs/job-3/replays/0-1", json=body)
        assert r.status_code in (400, 403), r.text
    assert board.running("job-3").replays["0-1"].answer is None
    good = {"verifier": VERIFIER.address, "reports": [report(VERIFIER)], "findings": []}
    assert client.post("/v1/jobs/job-3/replays/0-1", json=good).status_code == 200
    assert board.running("job-3").replays["0-1"].answer.reports == good["reports"]


def test_the_replay_queue_lists_what_is_unanswered_and_marks_what_a_worker_took(head, tmp_path) -> None:
    """The job's replay worker reads its work from ``GET /replays``: drawn, unanswered, not
    cancelled, oldest first, of the verifier it names (``?verifier=A``); fetching a request with ``?worker=G`` holds generation G answerable
    for it (the first to take it); a job that is not running has an empty, closed queue."""
    from gpucoin.head.jobs import Replay
    from tests.ledger.helpers import VERIFIER

    client, board, _ = head
    assert client.get("/v1/jobs/job-4/replays").json() == {"pending": [], "open": False}
    inbox = JobInbox(InboxConfig("job-4", DOMAIN.as_dict(), (WORKER.address,), 4, 8, 8))
    launch = JobLaunch(job_id="job-4", spec={}, node_ids=["n"], assignments=[], buckets=8, data_source="x", api_url="h")
    board.add_running("job-4", RunningJob(inbox=inbox, store=ContentStore(tmp_path / "s"), launch=launch))
    replays = board.running("job-4").replays
    for rid in ("0-1", "4-2", "8-3"):
        replays[rid] = Replay(request={"step_start": int(rid.split("-")[0])}, verifier=VERIFIER.address)
    replays["4-2"].cancelled = True
    replays["0-1.1"] = Replay(request={"step_start": 0}, verifier=WORKER.address)  # a second verifier's re-check
    assert client.get("/v1/jobs/job-4/replays").json() == {"pending": ["0-1", "8-3", "0-1.1"], "open": True}
    # each verifier's worker lists only its own replays
    mine = client.get("/v1/jobs/job-4/replays", params={"verifier": VERIFIER.address}).json()
    theirs = client.get("/v1/jobs/job-4/replays", params={"verifier": WORKER.address}).json()
    assert (mine["pending"], theirs["pending"]) == (["0-1", "8-3"], ["0-1.1"])
    # a long poll with nothing to do is held until work is drawn for that verifier
    nobody = "0x" + "77" * 20
    threading.Timer(0.3, lambda: replays.__setitem__("12-4", Replay(request={}, verifier=nobody))).start()
    held = client.get("/v1/jobs/job-4/replays", params={"verifier": nobody, "wait_s": 9}).json()
    assert held == {"pending": ["12-4"], "open": True}
    assert client.get("/v1/jobs/job-4/replays/0-1").json() == {"step_start": 0}
    assert replays["0-1"].started_by is None  # a plain read takes nothing
    assert client.get("/v1/jobs/job-4/replays/0-1?worker=2").json() == {"step_start": 0}
    assert client.get("/v1/jobs/job-4/replays/0-1?worker=3").status_code == 200
    assert replays["0-1"].started_by == 2
    assert client.get("/v1/jobs/job-4/replays/0-1?worker=x").status_code in (400, 422)
    board.remove_running("job-4")
    assert client.get("/v1/jobs/job-4/replays").json() == {"pending": [], "open": False}


def test_jobs_a_gone_head_left_are_failed_and_refunded_once(head, ledger: Ledger, tmp_path) -> None:
    """A restarted head keeps its queue and refunds what it was running; the embedded mode, whose
    head is gone for good, also refunds what was still queued. Twice changes nothing."""
    from gpucoin.head.scheduler import settle_lost_jobs

    client, board, loaded = head
    _upload(client, loaded)
    spec = loaded.spec.model_dump(mode="json")
    for n, job_id in enumerate(("job-q", "job-r"), 1):
        assert client.post("/v1/jobs", json={"order": _order(loaded, job_id, nonce=n), "spec": spec}).status_code == 200
    table = JobTable(ledger.engine)
    table.update("job-r", state=JobState.RUNNING)
    coord = Coordinator(ledger, ledger.policy, COORDINATOR, DOMAIN)
    budget = loaded.spec.budget_ugpc
    before = ledger.balance(wallet_account(CONSUMER.address))

    settle_lost_jobs(ledger, coord, table, board, "the head service restarted")
    assert table.get("job-r").state == JobState.FAILED.value and "restarted" in table.get("job-r").reason
    assert table.get("job-q").state == JobState.QUEUED.value
    assert ledger.balance(escrow_account("job-r")) == 0 and ledger.balance(escrow_account("job-q")) == budget

    for _ in range(2):
        settle_lost_jobs(ledger, coord, table, board, "the local run stopped", include_queued=True)
    assert table.get("job-q").state == JobState.FAILED.value
    assert ledger.balance(escrow_account("job-q")) == 0
    assert ledger.balance(wallet_account(CONSUMER.address)) == before + 2 * budget
    assert ledger.audit() == []
