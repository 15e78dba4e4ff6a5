"""A submitter's side of a head: upload the package, sign the JobOrder, queue, follow.

``gpucoin train JOB.yaml --address HEAD`` calls ``submit`` then, unless ``--detach``, ``follow``.
The JobOrder signs the spec as it runs (``spec.spec_digest``, overrides applied) and the
package's hash (``spec.package_hash``); the head keeps the package only under the hash its files
have, so what runs on the ranks is what the consumer signed for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gpucoin.head.client import HeadClient
from gpucoin.head.packages import pack
from gpucoin.head.records import EventKind, JobEvent, JobView
from gpucoin.spec import LoadedSpec
from gpucoin.wallet.messages import Domain, sign
from gpucoin.wallet.nonces import NonceSource

JOB_ORDER_TTL_S = 600
"""How long a JobOrder may wait to be taken by the head."""

FOLLOW_POLL_S = 1.0
"""How often ``follow`` asks the head."""

MAX_FOLLOW_S = 7 * 24 * 3600
"""The longest ``follow`` waits for one job."""


def submit(api_url: str, loaded: LoadedSpec, account, job_id: str | None = None) -> JobView:
    """Upload ``loaded``'s package, sign its JobOrder with ``account`` (the consumer) and queue it
    as ``job_id`` (None: a new one, ``coordinator.job.new_job_id``; a caller that picks it first
    knows which escrow is its own even if the head's answer is lost).

    The budget is escrowed by the head as it queues the job (refunded, what is left of it, when
    the job ends).

    Raises:
        HeadError: the head cannot be reached or refuses (too little money, a package or spec
            that does not match, ...), with its reason.
        SpecError: the package cannot be packed.
    """
    from gpucoin.coordinator.job import new_job_id

    client = HeadClient(api_url, retry_s=10.0)
    head = client.status()
    domain = Domain(chain_id=head.chain_id, verifying_contract=head.coordinator)
    client.put_package(loaded.package_hash, pack(loaded.module_dir))
    spec = loaded.spec
    order = sign(
        account,
        "JobOrder",
        domain,
        {
            "consumer": account.address,
            "jobId": job_id or new_job_id(spec.name),
            "specHash": loaded.spec_hash,
            "packageHash": loaded.package_hash,
            "workers": spec.workers,
            "bidPerWorkerHour": spec.bid_ugpc_per_worker_hour,
            "budget": spec.budget_ugpc,
            "nonce": NonceSource().next(),
            "deadline": int(time.time()) + JOB_ORDER_TTL_S,
        },
    )
    return client.submit_job(order.to_dict(), spec.model_dump(mode="json"))


def follow(
    api_url: str,
    job_id: str,
    on_event: Callable[[JobEvent], None] = lambda e: None,
    on_view: Callable[[JobView], None] = lambda v: None,
    timeout_s: float = MAX_FOLLOW_S,
) -> JobView:
    """Poll job ``job_id`` until it ended, handing each new log line to ``on_event`` and each
    view to ``on_view``; return its final view.

    Raises:
        HeadError: the head cannot be reached (for more than a minute) or has no such job;
            the job did not end within ``timeout_s``.
    """
    from gpucoin.exceptions import HeadError

    client = HeadClient(api_url, retry_s=60.0)
    seen = 0
    deadline = time.monotonic() + timeout_s
    while True:
        view = client.job(job_id)
        for ev in client.job_events(job_id, seen):
            on_event(ev)
            seen = max(seen, ev.seq)
        on_view(view)
        if view.state.ended:
            return view
        if time.monotonic() > deadline:
            raise HeadError(f"job {job_id} did not end within {timeout_s:.0f} s (it goes on; `gpucoin jobs` shows it)")
        time.sleep(FOLLOW_POLL_S)


def events_to_ui(ui) -> Callable[[JobEvent], None]:
    """An ``on_event`` for ``follow`` that makes the calls of ``ui`` (``coordinator.job.UI``) the
    head's runner made: status lines, notes, the training progress."""

    def on_event(ev: JobEvent) -> None:
        p = ev.progress
        if ev.kind == EventKind.STATUS:
            ui.status(ev.text)
        elif ev.kind == EventKind.TRAINING_STARTED and p is not None:
            ui.training_started(p.total_steps, p.step)
        elif ev.kind == EventKind.STEP and p is not None:
            ui.step(p.step, p.loss if p.loss is not None else float("nan"), p.tokens_per_s or 0.0)
        elif ev.kind == EventKind.TRAINING_DONE:
            ui.training_done()
        else:
            ui.note(ev.text)

    return on_event


def cancel(api_url: str, job_id: str, account) -> JobView:
    """Sign a JobCancel of ``job_id`` with ``account`` (its consumer) and send it.

    Raises:
        HeadError: the head cannot be reached, has no such job, or refuses (another signer).
    """
    client = HeadClient(api_url, retry_s=10.0)
    head = client.status()
    domain = Domain(chain_id=head.chain_id, verifying_contract=head.coordinator)
    msg = sign(
        account, "JobCancel", domain, {"consumer": account.address, "jobId": job_id, "nonce": NonceSource().next()}
    )
    return client.cancel_job(msg.to_dict())
