"""The head's HTTP API over a real ledger (SQLite and PostgreSQL), through FastAPI's test client:
what it admits, what it refuses and with which status, and that a refusal changes nothing.

Ray's view of the nodes is given as the mapping the admission rule reads (``head.admit`` is pure);
the module tests/integration/test_join.py does the same against a real cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gpucoin.coordinator.settle import Coordinator
from gpucoin.head.admit import PROVIDER_LABEL
from gpucoin.head.api import FAUCET_MAX_UGPC, make_app
from gpucoin.head.ray_state import RayNode
from gpucoin.head.records import ServiceConfig
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.wallet.messages import Domain, sign
from tests.conftest import exact_double
from tests.ledger.helpers import CONSUMER, COORDINATOR, DOMAIN, GPC, WORKER, Market, Signer, open_market

HEAD = "aa" * 28
VOL = "bb" * 28
DEAD = "cc" * 28
OTHERS = "ee" * 28
UNLABELED = "ff" * 28
OTHER = Account.from_key(b"\x09" * 32)
RAY = {
    HEAD: RayNode(HEAD, "127.0.0.1", is_head=True, alive=True, labels={}),
    VOL: RayNode(VOL, "127.0.0.1", is_head=False, alive=True, labels={PROVIDER_LABEL: WORKER.address}),
    DEAD: RayNode(DEAD, "127.0.0.1", is_head=False, alive=False, labels={PROVIDER_LABEL: WORKER.address}),
    # a node of another host, started for its own provider, nobody registered yet
    OTHERS: RayNode(OTHERS, "127.0.0.2", is_head=False, alive=True, labels={PROVIDER_LABEL: OTHER.address.lower()}),
    UNLABELED: RayNode(UNLABELED, "127.0.0.3", is_head=False, alive=True, labels={}),
}


def service_config(home: Path) -> ServiceConfig:
    """Settings of a head service whose Ray is never called (``ray_nodes`` is given)."""
    return ServiceConfig(
        home=home,
        ledger_url="sqlite://",
        dev=True,
        api_host="127.0.0.1",
        api_port=1,
        ray_address="127.0.0.1:2",
        dashboard_url="http://127.0.0.1:3",
        ray_token_path=home / "token",
    )


def _client(ledger: Ledger, tmp_path: Path) -> TestClient:
    cfg = service_config(tmp_path)
    coord = Coordinator(ledger, ledger.policy, COORDINATOR, DOMAIN)
    return TestClient(make_app(ledger, cfg, coord, lambda: RAY))


def _registration(who, node_id: str, stake: int, domain: Domain = DOMAIN, nonce: int = 1, ask: int = 800_000) -> dict:
    msg = sign(
        who,
        "NodeRegistration",
        domain,
        {
            "provider": who.address,
            "nodeId": node_id,
            "resources": '{"CPU": 1, "GPU": 0}',
            "askPerWorkerHour": ask,
            "stake": stake,
            "nonce": nonce,
            "deadline": 2**40,
        },
    )
    return json.loads(msg.to_json())


def _fund(client: TestClient, who, gpc: int) -> None:
    r = client.post(
        "/v1/faucet",
        json={"recipient": who.address, "amount_ugpc": gpc * GPC, "request_id": "fund-" + who.address[2:10]},
    )
    assert r.status_code == 200, r.text


def test_status_names_the_market_and_the_versions(ledger: Ledger, tmp_path) -> None:
    body = _client(ledger, tmp_path).get("/v1/status").json()
    assert body["dev"] is True and body["chain_id"] == 31337 and body["coordinator"] == COORDINATOR.address
    assert body["policy"]["name"] == ledger.policy.name and body["jobs"] == 0 and body["nodes"] == 0
    assert set(body["versions"]) == {"gpucoin", "python", "ray", "torch", "deepspeed"}


def test_a_live_volunteer_node_is_admitted_and_its_stake_bonded(ledger: Ledger, tmp_path) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    r = client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 500 * GPC)})
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["node_id"] == VOL and view["provider"] == WORKER.address and view["state"] == "alive"
    assert view["bonded_ugpc"] == 500 * GPC == ledger.balance(wallet_account(WORKER.address, "bonded"))
    assert [v["node_id"] for v in client.get("/v1/nodes").json()] == [VOL]
    # never checked: its intervals are replayed at the new-node rate
    assert view["checks"] == {"passed": 0, "other": 0, "clean_streak": 0, "check_probability": 1.0}
    assert ledger.audit() == []


def test_a_node_shows_its_record_over_every_job_and_its_check_probability(ledger: Ledger, tmp_path) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    assert client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 500 * GPC)}).status_code == 200
    m = Market(ledger, Signer(start=1_000))
    m.fund(CONSUMER, 100 * GPC)
    for job, verdicts in (("job-a", ["pass"]), ("job-b", ["pass", "fail", "pass", "pass"])):
        m.escrow(10 * GPC, job=job)
        m.assign(0, WORKER, job, VOL)
        previous = None
        for i, verdict in enumerate(verdicts):
            previous = m.receipts(i * 10, [WORKER], job=job, previous=previous)
            m.reports(previous, verdict)
    (view,) = client.get("/v1/nodes").json()
    p = ledger.policy.verification.check_probability
    assert view["checks"] == {"passed": 4, "other": 1, "clean_streak": 2, "check_probability": p} and p < 1.0


def test_a_provider_slashed_the_policys_limit_of_times_is_banned(ledger_url: str, tmp_path) -> None:
    """A node is banned after the policy's limit of proven frauds, over every job; the head's
    market leaves a banned node out of every round (``Scheduler.round`` reads ``banned``)."""
    from tests.ledger.helpers import POLICY

    policy = POLICY.model_copy(update={"slashing": POLICY.slashing.model_copy(update={"ban_after_frauds": 2})})
    ledger = open_market(ledger_url, policy=policy)
    try:
        client = _client(ledger, tmp_path)
        _fund(client, WORKER, 600)
        assert client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 500 * GPC)}).status_code == 200
        m = Market(ledger, Signer(start=1_000))
        m.fund(CONSUMER, 100 * GPC)
        seen = []
        for job in ("job-a", "job-b"):
            m.escrow(10 * GPC, job=job)
            m.assign(0, WORKER, job, VOL)
            (fail,) = m.reports(m.receipts(0, [WORKER], job=job), "fail")
            m.slash(fail, job=job)
            (view,) = client.get("/v1/nodes").json()
            seen.append((view["frauds"], view["banned"]))
        assert seen == [(1, False), (2, True)]
        assert ledger.proven_frauds([WORKER.address, CONSUMER.address]) == {WORKER.address: 2, CONSUMER.address: 0}
        assert ledger.audit() == []
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "node,who,stake,domain,status,detail",
    [
        (HEAD, WORKER, 0, DOMAIN, 403, "is the head node"),
        (DEAD, WORKER, 0, DOMAIN, 403, "no live node"),
        ("dd" * 28, WORKER, 0, DOMAIN, 403, "no live node"),
        (VOL, WORKER, 0, Domain(chain_id=1, verifying_contract=COORDINATOR.address), 400, "domain"),
        (VOL, WORKER, 10_000 * GPC, DOMAIN, 409, ""),
        (OTHERS, WORKER, 0, DOMAIN, 403, f"started for provider {OTHER.address.lower()}, not {WORKER.address}"),
        (UNLABELED, WORKER, 0, DOMAIN, 403, f"started for no provider (no Ray label {PROVIDER_LABEL})"),
    ],
    ids=[
        "head-node",
        "dead-node",
        "unknown-node",
        "other-domain",
        "stake-above-balance",
        "a-node-started-for-another-provider",
        "a-node-started-for-nobody",
    ],
)
def test_a_registration_the_head_must_not_admit_changes_nothing(
    ledger: Ledger, tmp_path, node, who, stake, domain, status, detail
) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    before = (ledger.balances(), len(ledger.messages()))
    r = client.post("/v1/nodes", json={"registration": _registration(who, node, stake, domain)})
    assert r.status_code == status, r.text
    assert detail.lower() in r.json()["detail"].lower()
    assert (ledger.balances(), len(ledger.messages())) == before


def test_a_node_another_provider_registered_is_refused(ledger: Ledger, tmp_path) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    assert client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 0)}).status_code == 200
    r = client.post("/v1/nodes", json={"registration": _registration(OTHER, VOL, 0, nonce=2)})
    assert r.status_code == 403 and f"registered by {WORKER.address}" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [{"registration": {"primaryType": "NodeRegistration"}}, {"registration": "x"}, {}, {"registration": {}, "x": 1}],
)
def test_malformed_registrations_are_400_or_422(ledger: Ledger, tmp_path, body) -> None:
    r = _client(ledger, tmp_path).post("/v1/nodes", json=body)
    assert r.status_code in (400, 422) and "Traceback" not in r.text


def test_the_faucet_pays_once_per_request_id(ledger: Ledger, tmp_path) -> None:
    client = _client(ledger, tmp_path)
    body = {"recipient": OTHER.address, "amount_ugpc": 5 * GPC, "request_id": "a-retried-request"}
    assert client.post("/v1/faucet", json=body).json()["available_ugpc"] == 5 * GPC
    assert client.post("/v1/faucet", json=body).json()["available_ugpc"] == 5 * GPC
    other = {**body, "amount_ugpc": 7 * GPC}  # the same id with other content is another grant, not a no-op
    assert client.post("/v1/faucet", json=other).json()["available_ugpc"] == 12 * GPC
    too_much = {**body, "amount_ugpc": FAUCET_MAX_UGPC + 1, "request_id": "too-much-1"}
    assert client.post("/v1/faucet", json=too_much).status_code == 403
    bad = {**body, "recipient": "0x123", "request_id": "bad-address"}
    assert client.post("/v1/faucet", json=bad).status_code == 400
    assert ledger.audit() == []


def test_only_a_dev_network_has_a_faucet(ledger_url: str, tmp_path) -> None:
    ledger = open_market(ledger_url, dev=False)
    try:
        r = _client(ledger, tmp_path).post(
            "/v1/faucet", json={"recipient": OTHER.address, "amount_ugpc": GPC, "request_id": "not-on-mainnet"}
        )
        assert r.status_code == 403 and "dev network" in r.json()["detail"]
        assert ledger.balance(wallet_account(OTHER.address)) == 0
    finally:
        ledger.close()


def test_metrics_count_what_the_ledger_holds(ledger: Ledger, tmp_path) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 500 * GPC)})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert families["gpucoin_bonded_stake_ugpc"].samples[0].value == 500 * GPC
    assert families["gpucoin_minted_ugpc"].samples[0].value == 600 * GPC
    assert {s.labels["state"]: s.value for s in families["gpucoin_nodes"].samples} == {"alive": 1.0, "gone": 0.0}
    kinds = {s.labels["type"]: s.value for s in families["gpucoin_messages"].samples}
    assert kinds["NodeRegistration"] == 1 and kinds["Faucet"] == 1 and kinds["Genesis"] == 1


def _signed(who, kind: str, amount: int, provider=None, nonce: int = 7) -> dict:
    msg = sign(who, kind, DOMAIN, {"provider": (provider or who).address, "amount": amount, "nonce": nonce})
    return json.loads(msg.to_json())


def test_stake_unbonds_then_matures_then_is_withdrawn(ledger: Ledger, tmp_path) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    assert client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 500 * GPC)}).status_code == 200
    r = client.post("/v1/unbond", json={"message": _signed(WORKER, "Unbond", 200 * GPC)})
    assert r.status_code == 200, r.text
    view = r.json()
    assert (view["available_ugpc"], view["bonded_ugpc"], view["unbonding_ugpc"]) == (100 * GPC, 300 * GPC, 200 * GPC)
    assert view["withdrawable_ugpc"] == 0
    assert view["next_maturity_epoch"] == view["epoch"] + ledger.policy.bonding.unbonding_epochs
    early = client.post("/v1/withdraw", json={"message": _signed(WORKER, "Withdraw", 200 * GPC, nonce=8)})
    assert early.status_code == 409, early.text  # not matured: nothing moves
    assert client.get(f"/v1/accounts/{WORKER.address}").json()["unbonding_ugpc"] == 200 * GPC
    ledger.clock.advance((ledger.policy.bonding.unbonding_epochs + 1) * ledger.policy.tokenomics.epoch_length_s)
    assert client.get(f"/v1/accounts/{WORKER.address}").json()["withdrawable_ugpc"] == 200 * GPC
    done = client.post("/v1/withdraw", json={"message": _signed(WORKER, "Withdraw", 200 * GPC, nonce=9)})
    assert done.status_code == 200, done.text
    assert (done.json()["available_ugpc"], done.json()["unbonding_ugpc"]) == (300 * GPC, 0)
    assert ledger.audit() == []


@pytest.mark.parametrize("kind", ["Unbond", "Withdraw"])
def test_nobody_unbonds_or_withdraws_anothers_stake(ledger: Ledger, tmp_path, kind) -> None:
    client = _client(ledger, tmp_path)
    _fund(client, WORKER, 600)
    client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 500 * GPC)})
    before = ledger.balances()
    r = client.post(f"/v1/{kind.lower()}", json={"message": _signed(OTHER, kind, 100 * GPC, provider=WORKER)})
    assert r.status_code in (400, 403), r.text
    wrong_kind = client.post(f"/v1/{kind.lower()}", json={"message": _registration(WORKER, VOL, 0, nonce=3)})
    assert wrong_kind.status_code == 400 and f"expected a signed {kind}" in wrong_kind.json()["detail"]
    assert ledger.balances() == before


def test_answers_are_json_javascript_reads_exactly(ledger: Ledger, tmp_path) -> None:
    """An ask above 2**53 - 1 µGPC comes back as a decimal string; the typed client reads it as the int."""
    from gpucoin.head.records import NodeView

    client = _client(ledger, tmp_path)
    big = 2**60 + 1
    r = client.post("/v1/nodes", json={"registration": _registration(WORKER, VOL, 0, ask=big)})
    assert r.status_code == 200, r.text
    for text in (r.text, client.get("/v1/nodes").text, client.get("/v1/status").text):
        json.loads(text, parse_int=exact_double)
    assert json.loads(r.text)["ask_ugpc_per_worker_hour"] == str(big)
    assert NodeView.model_validate_json(r.text).ask_ugpc_per_worker_hour == big


def test_a_forged_registration_is_refused_before_ray_or_the_ledger_is_read(ledger: Ledger, tmp_path) -> None:
    calls = []
    coord = Coordinator(ledger, ledger.policy, COORDINATOR, DOMAIN)
    client = TestClient(make_app(ledger, service_config(tmp_path), coord, lambda: calls.append(1) or RAY))
    reg = _registration(WORKER, VOL, 0)
    reg["message"]["askPerWorkerHour"] += 1  # the signature no longer covers the message
    before = len(ledger.messages())
    r = client.post("/v1/nodes", json={"registration": reg})
    assert r.status_code == 400 and calls == [] and len(ledger.messages()) == before, r.text
