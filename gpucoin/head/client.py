"""A client of the head's HTTP API (``gpucoin.head.api``): JSON in, typed records out."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter

from gpucoin.exceptions import HeadError, ObjectMissing
from gpucoin.head.records import (
    AccountView,
    FaucetRequest,
    FaucetResult,
    HasAnswer,
    HasRequest,
    HeadStatus,
    InboxAnswer,
    JobEvent,
    JobLaunch,
    JobView,
    NodeView,
    ObjectAnswer,
    PackageAnswer,
    ProgressReport,
    ReceiptSubmission,
    RegisterRequest,
    ReplayAnswer,
    ReplayQueue,
    SignedRequest,
    StopAnswer,
    SubmitJobRequest,
)
from gpucoin.jsonsafe import dumps as js_safe_dumps
from gpucoin.runtime.inbox import InboxReply

REQUEST_TIMEOUT_S = 30.0
"""Timeout of one HTTP request to the head."""

MAX_BODY_BYTES = 16 << 20
"""The largest answer read from the head."""

T = TypeVar("T")


class HeadClient:
    """Requests to the head at ``api_url`` (``http(s)://host:port``).

    Every method raises ``HeadError`` when the head cannot be reached, refuses (its one-line
    ``detail`` is quoted) or answers outside the expected record. A head that cannot be reached
    is tried again for ``retry_s`` seconds (doubling waits of 0.5 s up to 5 s); a refusal is final.
    """

    def __init__(self, api_url: str, retry_s: float = 0.0):
        self.api_url = api_url.rstrip("/")
        self.retry_s = retry_s

    def _raw(self, method: str, path: str, data: bytes | None, content_type: str) -> bytes:
        req = urllib.request.Request(
            f"{self.api_url}{path}", data=data, method=method, headers={"Content-Type": content_type}
        )
        deadline = time.monotonic() + self.retry_s
        delay = 0.5
        while True:
            try:
                with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:  # noqa: S310 - http(s), checked by api_url_of
                    return r.read(MAX_BODY_BYTES)
            except urllib.error.HTTPError as e:
                if e.code in (502, 503, 504) and time.monotonic() + delay <= deadline:
                    pass  # a head that is starting again
                elif e.code == 410:  # the job's store does not hold the object asked for
                    raise ObjectMissing(_detail(e)) from None
                else:
                    raise HeadError(f"the head refused {method} {path} ({e.code}): {_detail(e)}") from None
            except (urllib.error.URLError, OSError) as e:
                if time.monotonic() + delay > deadline:
                    raise HeadError(f"cannot reach the head at {self.api_url}: {getattr(e, 'reason', e)}") from None
            time.sleep(delay)
            delay = min(5.0, delay * 2)

    def _call(self, method: str, path: str, body: BaseModel | None, shape: Any) -> Any:
        data = None if body is None else js_safe_dumps(body.model_dump(mode="json")).encode()
        raw = self._raw(method, path, data, "application/json")
        try:
            return TypeAdapter(shape).validate_json(raw)
        except ValueError as e:
            raise HeadError(
                f"the head at {self.api_url} answered outside {path}'s schema: {str(e).splitlines()[0]}"
            ) from None

    def status(self) -> HeadStatus:
        """``GET /v1/status``."""
        return self._call("GET", "/v1/status", None, HeadStatus)

    def nodes(self) -> list[NodeView]:
        """``GET /v1/nodes``."""
        return self._call("GET", "/v1/nodes", None, list[NodeView])

    def register(self, registration: dict) -> NodeView:
        """``POST /v1/nodes`` with a signed NodeRegistration (``SignedMessage`` as a dict)."""
        return self._call("POST", "/v1/nodes", RegisterRequest(registration=registration), NodeView)

    def faucet(self, recipient: str, amount_ugpc: int, request_id: str) -> FaucetResult:
        """``POST /v1/faucet`` (a dev head only)."""
        req = FaucetRequest(recipient=recipient, amount_ugpc=amount_ugpc, request_id=request_id)
        return self._call("POST", "/v1/faucet", req, FaucetResult)

    def account(self, address: str) -> AccountView:
        """``GET /v1/accounts/{address}``."""
        return self._call("GET", f"/v1/accounts/{urllib.parse.quote(address)}", None, AccountView)

    def unbond(self, message: dict) -> AccountView:
        """``POST /v1/unbond`` with a signed Unbond (``SignedMessage`` as a dict)."""
        return self._call("POST", "/v1/unbond", SignedRequest(message=message), AccountView)

    def withdraw(self, message: dict) -> AccountView:
        """``POST /v1/withdraw`` with a signed Withdraw (``SignedMessage`` as a dict)."""
        return self._call("POST", "/v1/withdraw", SignedRequest(message=message), AccountView)

    # -- jobs -------------------------------------------------------------------
    def put_package(self, package_hash: str, zipped: bytes) -> PackageAnswer:
        """``PUT /v1/packages/{hash}`` with the package zip (``head.packages.pack``)."""
        raw = self._raw("PUT", f"/v1/packages/{urllib.parse.quote(package_hash)}", zipped, "application/zip")
        return TypeAdapter(PackageAnswer).validate_json(raw)

    def submit_job(self, order: dict, spec: dict) -> JobView:
        """``POST /v1/jobs`` with a signed JobOrder and its spec: escrow and queue."""
        return self._call("POST", "/v1/jobs", SubmitJobRequest(order=order, spec=spec), JobView)

    def jobs(self) -> list[JobView]:
        """``GET /v1/jobs``."""
        return self._call("GET", "/v1/jobs", None, list[JobView])

    def job(self, job_id: str) -> JobView:
        """``GET /v1/jobs/{id}``."""
        return self._call("GET", f"/v1/jobs/{_q(job_id)}", None, JobView)

    def job_events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """``GET /v1/jobs/{id}/events?after=N``: the job's log lines after the ``after``-th."""
        return self._call("GET", f"/v1/jobs/{_q(job_id)}/events?after={int(after)}", None, list[JobEvent])

    def cancel_job(self, message: dict) -> JobView:
        """``POST /v1/jobs/{id}/cancel`` with the consumer's signed JobCancel (``SignedMessage`` as a dict)."""
        job_id = str(message.get("message", {}).get("jobId", ""))
        return self._call("POST", f"/v1/jobs/{_q(job_id)}/cancel", SignedRequest(message=message), JobView)

    def job_launch(self, job_id: str) -> JobLaunch:
        """``GET /v1/jobs/{id}/launch`` (the job's Ray driver)."""
        return self._call("GET", f"/v1/jobs/{_q(job_id)}/launch", None, JobLaunch)

    def job_stop_reason(self, job_id: str) -> str | None:
        """``GET /v1/jobs/{id}/stop`` (a rank, before each interval)."""
        return self._call("GET", f"/v1/jobs/{_q(job_id)}/stop", None, StopAnswer).reason

    def job_progress(self, job_id: str, step: int, loss: float, lr: float) -> None:
        """``POST /v1/jobs/{id}/progress`` (rank 0)."""
        self._call("POST", f"/v1/jobs/{_q(job_id)}/progress", ProgressReport(step=step, loss=loss, lr=lr), StopAnswer)

    def job_receipt(self, job_id: str, rank: int, receipt_json: str, sketches, losses) -> InboxReply:
        """``POST /v1/jobs/{id}/receipts``: a rank's signed receipt, sketches (steps, B) and losses."""
        body = ReceiptSubmission(
            rank=rank, receipt_json=receipt_json, sketches=[list(map(float, row)) for row in sketches], losses=losses
        )
        answer = self._call("POST", f"/v1/jobs/{_q(job_id)}/receipts", body, InboxAnswer)
        return InboxReply(answer.accepted, answer.reason, answer.busy)

    def job_put(self, job_id: str, data: bytes) -> str:
        """``PUT /v1/jobs/{id}/objects``: store ``data``; returns its name (``0x`` + sha256)."""
        raw = self._raw("PUT", f"/v1/jobs/{_q(job_id)}/objects", data, "application/octet-stream")
        return TypeAdapter(ObjectAnswer).validate_json(raw).digest

    def job_get(self, job_id: str, digest: str) -> bytes:
        """``GET /v1/jobs/{id}/objects/{digest}``: the object's bytes, checked against its name."""
        from gpucoin.storage.manifest import sha256_digest

        data = self._raw("GET", f"/v1/jobs/{_q(job_id)}/objects/{_q(digest)}", None, "application/octet-stream")
        if sha256_digest(data) != digest:
            raise HeadError(f"object {digest} of job {job_id}: the head sent bytes of another hash")
        return data

    def job_has(self, job_id: str, digests: list[str]) -> list[bool]:
        """``POST /v1/jobs/{id}/objects/has``."""
        return self._call("POST", f"/v1/jobs/{_q(job_id)}/objects/has", HasRequest(digests=digests), HasAnswer).present

    def replay_queue(self, job_id: str, verifier: str | None = None, wait_s: float = 0.0) -> ReplayQueue:
        """``GET /v1/jobs/{id}/replays`` (the job's replay worker): what it is to replay (of
        ``verifier``'s replays only, when given), the head holding the request up to ``wait_s``
        seconds while there is nothing."""
        query = urllib.parse.urlencode({**({"verifier": verifier} if verifier else {}), "wait_s": wait_s})
        return self._call("GET", f"/v1/jobs/{_q(job_id)}/replays?{query}", None, ReplayQueue)

    def replay_request(self, job_id: str, replay_id: str, worker: int | None = None) -> dict:
        """``GET /v1/jobs/{id}/replays/{rid}`` (the job's replay worker, generation ``worker``,
        which the head then holds answerable for it): the request as JSON."""
        query = "" if worker is None else f"?worker={int(worker)}"
        return self._call("GET", f"/v1/jobs/{_q(job_id)}/replays/{_q(replay_id)}{query}", None, dict)

    def replay_result(self, job_id: str, replay_id: str, result: dict) -> None:
        """``POST /v1/jobs/{id}/replays/{rid}``: the verifier's signed reports and findings."""
        self._call("POST", f"/v1/jobs/{_q(job_id)}/replays/{_q(replay_id)}", ReplayAnswer(**result), StopAnswer)


def _q(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(e.read(1 << 16)).get("detail")
    except (ValueError, AttributeError, OSError):
        return e.reason
    if isinstance(detail, list):  # FastAPI's validation errors: the first one, in one line
        first = detail[0] if detail else {}
        return f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg', '')}"
    return str(detail)
