"""One job in the embedded local mode, end to end (SPEC.md, Flow of one job).

spec -> preflight (nothing written) -> dev wallets, faucet, volunteers bond and register ->
JobOrder signed, budget escrowed -> local Ray cluster -> market clears -> ranks placed on the
chosen nodes -> per interval: receipts checked and recorded, draw, replay on the verifier
node, verdict -> settlement (burn, treasury; slash on fraud) -> epochs close and mint ->
refund -> final evaluation -> audit -> summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from gpucoin.cluster.embedded import EmbeddedCluster, NodeSpec
from gpucoin.cluster.local import engineer_available_after_faucet, fund_engineer, participant, register_volunteer
from gpucoin.coordinator.settle import Coordinator
from gpucoin.exceptions import InsufficientFunds, NoPlacement, SignatureError, SpecError, TrainingError
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.money import format_gpc
from gpucoin.policy.model import Policy
from gpucoin.policy.tokenomics import SettledInterval, check_probability, epoch_of, interval_payment_ugpc
from gpucoin.runtime.checkpoint import tag_for
from gpucoin.runtime.sketch import sketch_root
from gpucoin.scheduler.market import Offer, Order, clear
from gpucoin.spec import LoadedSpec
from gpucoin.verify.sampling import is_checked
from gpucoin.wallet.messages import Domain, SignedMessage, sign, verify

POLL_INTERVAL_S = 0.5
JOB_ORDER_TTL_S = 3600
MAX_RUN_S = 6 * 3600
"""Upper bound on one local run's wall time; past it the run is stopped as failed."""


class UI(Protocol):
    """What the flow reports while it runs (the CLI renders it with rich)."""

    def status(self, text: str) -> None: ...
    def training_started(self, total_steps: int, first_step: int) -> None: ...
    def step(self, step: int, loss: float, tokens_per_s: float) -> None: ...
    def note(self, text: str) -> None: ...
    def training_done(self) -> None: ...


class QuietUI:
    """A UI that shows nothing."""

    def status(self, text: str) -> None:
        pass

    def training_started(self, total_steps: int, first_step: int) -> None:
        pass

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def training_done(self) -> None:
        pass


@dataclass
class LocalOptions:
    """Settings of one embedded local run (the ``gpucoin train`` flags).

    Attributes:
        home: state directory (ledger, dev wallets, checkpoints); default ``~/.gpucoin/local``.
        volunteers: volunteer Ray nodes to start.
        stake_ugpc: bond of each dev volunteer, µGPC.
        ask_ugpc_per_worker_hour: ask of each dev volunteer, µGPC per worker-hour.
        head_port: GCS port of the local head (None: a free one).
        seed_secret: sampling secret (None: fresh random bytes; tests may fix it).
        node_env: extra environment per node name (``vol0``...), e.g. test fault injection.
    """

    policy: Policy
    home: Path = field(default_factory=lambda: Path.home() / ".gpucoin" / "local")
    volunteers: int = 2
    stake_ugpc: int = 500_000_000
    ask_ugpc_per_worker_hour: int = 800_000
    head_port: int | None = None
    seed_secret: bytes | None = None
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Interval:
    """The coordinator's view of one checkpoint interval."""

    start: int
    end: int
    receipts: dict[int, SignedMessage] = field(default_factory=dict)
    sketches: dict[int, np.ndarray] = field(default_factory=dict)
    wall_ms: int = 0
    checked: bool = False
    pending: object = None
    verifier: str | None = None
    outcome: str = "open"  # open -> pending -> passed | failed | unchecked; void after a proven fraud


def new_job_id(name: str) -> str:
    """A job id: the spec name, the UTC time and 4 random hex digits."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _import_job_module(loaded: LoadedSpec):
    import importlib

    parent = str(loaded.module_dir.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return importlib.import_module(loaded.spec.module)


def _data_source(loaded: LoadedSpec) -> str:
    src = loaded.spec.data.source
    if src == "pypi":
        return src
    p = Path(src)
    return str(p if p.is_absolute() else (loaded.job_dir / p).resolve())


def preflight(loaded: LoadedSpec, opts: LocalOptions, coord: Coordinator, engineer) -> None:
    """Every check that can refuse the job, before anything is written or started.

    Raises:
        NoPlacement: more workers than volunteers, or a bid below the volunteers' ask.
        InsufficientFunds: a budget the engineer's wallet cannot cover.
    """
    spec = loaded.spec
    offers = [Offer(f"vol{i}", f"vol{i}", opts.ask_ugpc_per_worker_hour, 1, opts.stake_ugpc) for i in range(opts.volunteers)]
    order = Order(spec.name, spec.bid_ugpc_per_worker_hour, spec.workers, 1, 0.0)
    result = clear([order], offers, opts.policy.market)
    if not result.placements:
        raise NoPlacement(f"job {spec.name!r} cannot be placed on {opts.volunteers} local volunteers: {result.unplaced[spec.name]}")
    have = engineer_available_after_faucet(coord, engineer)
    if spec.budget_ugpc > have:
        raise InsufficientFunds(f"budget {format_gpc(spec.budget_ugpc)} GPC exceeds the {format_gpc(have)} GPC available in the engineer's wallet {engineer.address}")


def open_ledger(opts: LocalOptions) -> Ledger:
    """The local ledger (SQLite under ``home``)."""
    opts.home.mkdir(parents=True, exist_ok=True)
    return Ledger(f"sqlite:///{opts.home / 'ledger.db'}")


def train_local(loaded: LoadedSpec, opts: LocalOptions, ui: UI | None = None) -> dict:
    """Run ``loaded`` on an embedded local cluster and return the summary (see ``Summary keys`` in README).

    Raises:
        GpucoinError subclasses for bad input (before any ledger change), ClusterError,
        TrainingError. On any failure after the escrow, what is left in escrow is refunded.
    """
    ui = ui or QuietUI()
    spec = loaded.spec
    policy = opts.policy
    home = opts.home
    ledger = open_ledger(opts)
    try:
        coordinator_p = participant("coordinator", home)
        engineer = participant("engineer", home)
        domain = Domain(chain_id=policy.chain_id, verifying_contract=coordinator_p.address)
        coord = Coordinator(ledger, policy, coordinator_p.account, domain)
        preflight(loaded, opts, coord, engineer)

        ui.status("preparing the corpus")
        module = _import_job_module(loaded)
        source = _data_source(loaded)
        corpus = module.prepare_corpus(source, val_fraction=spec.data.val_fraction)

        job_id = new_job_id(spec.name)
        job_dir = home / "jobs" / job_id
        volunteers = [participant(f"vol{i}", home) for i in range(opts.volunteers)]
        verifier = participant("verifier0", home)
        before = ledger.balances()
        fund_engineer(coord, engineer)
        order = sign(
            engineer.account,
            "JobOrder",
            domain,
            {
                "consumer": engineer.address,
                "jobId": job_id,
                "specHash": loaded.spec_hash,
                "workers": spec.workers,
                "bidPerWorkerHour": spec.bid_ugpc_per_worker_hour,
                "budget": spec.budget_ugpc,
                "nonce": coord.nonces.next(),
                "deadline": int(time.time()) + JOB_ORDER_TTL_S,
            },
        )
        coord.escrow(order)
        try:
            summary = _run(loaded, opts, ui, coord, order, job_id, job_dir, volunteers, verifier, engineer, module, corpus, source)
        finally:
            refunded = coord.refund(job_id, order)
        summary["ledger"]["refunded"] = refunded
        after = ledger.balances()
        summary["accounts"] = {
            a: {"before": before.get(a, 0), "after": after.get(a, 0), "change": after.get(a, 0) - before.get(a, 0)}
            for a in sorted(set(before) | set(after))
            if after.get(a, 0) != before.get(a, 0)
        }
        totals = ledger.totals()
        summary["ledger"].update({"supply": totals["supply"], "total_minted": totals["minted"], "total_burned": totals["burned"]})
        problems = ledger.audit(hard_cap_ugpc=policy.tokenomics.hard_cap_ugpc)
        summary["audit"] = "ok" if not problems else problems
        return summary
    finally:
        ledger.close()


def _run(loaded, opts, ui, coord, order, job_id, job_dir, volunteers, verifier, engineer, module, corpus, source) -> dict:
    import ray

    from gpucoin.runtime.inbox import JobInbox
    from gpucoin.runtime.trainer import launch
    from gpucoin.verify.verifier import check_interval

    spec, policy = loaded.spec, opts.policy
    ledger = coord.ledger
    host_gpus = _host_gpu_count()
    nodes = [
        NodeSpec(p.name, 1, {**p.node_env(), **opts.node_env.get(p.name, {})}, gpu=i if i < host_gpus and p in volunteers else None)
        for i, p in enumerate([*volunteers, verifier])
    ]
    ui.status(f"starting a local Ray cluster: head + {len(volunteers)} volunteers + 1 verifier")
    t_cluster = time.monotonic()
    with EmbeddedCluster(job_dir / "logs", nodes, head_port=opts.head_port, runtime_env={"py_modules": [str(loaded.module_dir)]}) as cluster:
        cluster_s = time.monotonic() - t_cluster
        registrations = {}
        for v in volunteers:
            registrations[v.name] = register_volunteer(coord, v, cluster.node_id(v.name), opts.ask_ugpc_per_worker_hour, opts.stake_ugpc)
        offers = [
            Offer(cluster.node_id(v.name), v.address, opts.ask_ugpc_per_worker_hour, 1, ledger.balance(wallet_account(v.address, "bonded")))
            for v in volunteers
        ]
        result = clear([Order(job_id, spec.bid_ugpc_per_worker_hour, spec.workers, 1, time.time())], offers, policy.market)
        if not result.placements:
            raise NoPlacement(f"job {job_id} could not be placed: {result.unplaced[job_id]}")
        placement = result.placements[0]
        provider_of = {o.node_id: o.provider for o in offers}
        rank_worker = [provider_of[n] for n in placement.node_ids]
        name_of = {cluster.node_id(v.name): v.name for v in volunteers}
        ui.note(
            f"market: job {job_id} placed on {', '.join(name_of[n] for n in placement.node_ids)} "
            f"at {format_gpc(placement.price_ugpc_per_worker_hour)} GPC/worker-hour (bid {spec.bid_gpc_per_worker_hour})"
        )

        head = cluster.node_id("head")
        inbox = ray.remote(JobInbox).options(num_cpus=0, label_selector={"ray.io/node-id": head}).remote()
        ckpt_dir = job_dir / "checkpoints"
        buckets = policy.verification.sketch_buckets
        run = launch(
            loaded, job_id=job_id, node_ids=list(placement.node_ids), inbox=inbox, ckpt_dir=ckpt_dir,
            storage_dir=job_dir / "ray_train", domain=coord.domain.as_dict(), buckets=buckets, data_source=source,
        )
        replay_remote = ray.remote(num_cpus=1, max_retries=0)(check_interval).options(label_selector={"ray.io/node-id": cluster.node_id(verifier.name)})

        secret = opts.seed_secret or secrets.token_bytes(32)
        intervals = {s: Interval(s, e) for s, e in spec.intervals()}
        passed_by_node: dict[str, int] = {w: 0 for w in rank_worker}
        failed_nodes: set[str] = set()
        genesis_s = ledger.messages()[0].recorded_at / 1e6
        last_minted = _last_minted_epoch(ledger)
        by_epoch: dict[int, list[SettledInterval]] = {}
        counts = {"signed": 0, "checked": 0, "passed": 0, "failed": 0, "rejected": 0}
        distances: list[float] = []
        money = {"escrowed": spec.budget_ugpc, "paid": 0, "burned": 0, "treasury": 0, "minted": 0, "slashed": 0}
        clock = {"t": None, "step": 0, "t_step": None}
        fraud: dict[str, object] = {"at": None, "reason": None}
        sketch_dir = job_dir / "sketches"
        sketch_dir.mkdir(parents=True, exist_ok=True)
        tokens_per_step = spec.global_batch_size * spec.model.block_size
        start_wall = time.monotonic()
        train_s = 0.0

        def current_epoch() -> int:
            return max(epoch_of(time.time(), genesis_s, policy.tokenomics), last_minted + 1)

        def settle(iv: Interval, verifier_addr: str | None) -> None:
            epoch = current_epoch()
            ordered = [iv.receipts[r] for r in range(spec.workers)]
            pay = interval_payment_ugpc(placement.price_ugpc_per_worker_hour, spec.workers, iv.wall_ms)
            charged = coord.settle_interval(job_id, ordered, pay, epoch) if pay else 0
            money["paid"] += charged
            from gpucoin.policy.tokenomics import split_payment

            b, t = split_payment(charged, policy.tokenomics)
            money["burned"] += b if policy.tokenomics.mode == "burn_and_mint" else 0
            money["treasury"] += t
            if charged:
                by_epoch.setdefault(epoch, []).append(SettledInterval(tuple(r.digest for r in ordered), tuple(rank_worker), verifier_addr, charged))

        def close_epochs(force: bool) -> None:
            nonlocal last_minted
            now_epoch = epoch_of(time.time(), genesis_s, policy.tokenomics)
            for ep in sorted(by_epoch):
                if ep < now_epoch or force:
                    rewards = coord.mint_epoch(ep, job_id, by_epoch.pop(ep))
                    money["minted"] += sum(r.amount_ugpc for r in rewards)
                    last_minted = max(last_minted, ep)
                    if rewards:
                        ui.note(f"epoch {ep} closed: minted {format_gpc(sum(r.amount_ugpc for r in rewards))} GPC to {len({r.address for r in rewards})} accounts")

        def on_receipt(rank: int, receipt_json: str, sk: np.ndarray) -> None:
            receipt = SignedMessage.from_json(receipt_json)
            m = receipt.message
            iv = intervals.get(m["stepStart"])
            try:
                verify(receipt, expected_signer=rank_worker[rank], domain=coord.domain)
                if iv is None or m["stepEnd"] != iv.end or m["rank"] != rank or m["jobId"] != job_id:
                    raise SignatureError(f"receipt for steps {m['stepStart']}-{m['stepEnd']} rank {m['rank']} does not match the job's intervals")
                if sketch_root(m["stepStart"], sk) != m["sketchRoot"]:
                    raise SignatureError("the sketches sent do not hash to the signed sketch root")
            except SignatureError as e:
                counts["rejected"] += 1
                ui.note(f"receipt from rank {rank} rejected: {e}")
                return
            coord.record(receipt)
            counts["signed"] += 1
            iv.receipts[rank], iv.sketches[rank] = receipt, sk
            # kept beside the checkpoints: the receipt commits to them, a verifier may ask for them later
            np.save(sketch_dir / f"rank{rank}-step{iv.start:08d}.npy", sk)
            if len(iv.receipts) == spec.workers:
                interval_done(iv)

        def interval_done(iv: Interval) -> None:
            now = time.monotonic()
            iv.wall_ms = int((now - (clock["t"] or now)) * 1000)
            clock["t"] = now
            if fraud["at"] is not None and iv.start > fraud["at"]:
                iv.outcome = "void"  # trained with a proven cheater: not charged, not rewarded
                return
            digests = [iv.receipts[r].digest for r in range(spec.workers)]
            p = max(check_probability(policy.verification, passed_by_node[w], w in failed_nodes) for w in rank_worker)
            if is_checked(secret, digests, p):
                iv.checked, iv.outcome = True, "pending"
                counts["checked"] += 1
                prev = intervals.get(iv.start - spec.checkpoint_interval_steps) if iv.start else None
                start_hash = prev.receipts[0].message["checkpointHash"] if prev else None
                committed = np.stack([iv.sketches[r] for r in range(spec.workers)])
                iv.pending = replay_remote.remote(
                    spec.model_dump(mode="json"), source, str(ckpt_dir), iv.start, iv.end, buckets, committed, digests,
                    start_hash, policy.verification.tolerance_rel_l2, coord.domain.as_dict(),
                )
                ui.note(f"steps {iv.start}-{iv.end}: receipts signed by {spec.workers} ranks; drawn for replay (p={p:.2f})")
            else:
                iv.outcome = "unchecked"
                settle(iv, None)
                ui.note(f"steps {iv.start}-{iv.end}: receipts signed by {spec.workers} ranks; not drawn (p={p:.2f}), settled")

        def on_replay(iv: Interval, result: dict) -> None:
            iv.verifier = result["verifier"]
            if fraud["at"] is not None and iv.start > fraud["at"]:
                iv.outcome = "void"
                return
            reports = [SignedMessage.from_json(r) for r in result["reports"]]
            for rep in reports:
                verify(rep, expected_signer=verifier.address, domain=coord.domain)
                coord.record(rep)
            bad = [(rank, dist) for rank, ok, dist, _ in result["verdicts"] if not ok]
            worst = max(d for _, _, d, _ in result["verdicts"])
            distances.append(worst)
            if not bad:
                iv.outcome = "passed"
                counts["passed"] += 1
                for w in rank_worker:
                    passed_by_node[w] += 1
                settle(iv, iv.verifier)
                ui.note(f"steps {iv.start}-{iv.end}: replay passed (max relative L2 {worst:.1e}), settled")
            else:
                iv.outcome = "failed"
                counts["failed"] += 1
                for rank, dist in bad:
                    cheater = rank_worker[rank]
                    failed_nodes.add(cheater)
                    money["slashed"] += coord.slash(job_id, cheater, iv.verifier, iv.receipts[rank])
                    ui.note(f"steps {iv.start}-{iv.end}: rank {rank} FAILED replay (relative L2 {dist:.2e}); its bond was slashed")
                fraud["at"] = iv.start if fraud["at"] is None else min(fraud["at"], iv.start)
                fraud["reason"] = f"rank(s) {[r for r, _ in bad]} failed the replay of steps {iv.start}-{iv.end}"
                # intervals after the fraud that are not settled yet earn nothing (SPEC.md, Money);
                # ones already settled unchecked stay settled
                for later in intervals.values():
                    if later.start > iv.start and later.outcome in ("open", "pending"):
                        later.outcome = "void"
                inbox.stop.remote(fraud["reason"])
                ui.note(f"stopping the job: {fraud['reason']}")

        deadline = time.monotonic() + MAX_RUN_S
        started = False
        while True:
            if time.monotonic() > deadline:
                raise TrainingError(f"job {job_id} did not finish within {MAX_RUN_S} s")
            for ev in ray.get(inbox.poll.remote()):
                if ev[0] == "started":
                    clock["t"] = clock["t_step"] = time.monotonic()
                    if not started:
                        ui.training_started(spec.steps, ev[1])
                        started = True
                elif ev[0] == "progress":
                    _, step, loss, _lr = ev
                    now = time.monotonic()
                    dt = now - (clock["t_step"] or now)
                    tps = tokens_per_step * (step - clock["step"]) / dt if dt > 0 else 0.0
                    clock["step"], clock["t_step"] = step, now
                    ui.step(step, loss, tps)
                elif ev[0] == "receipt":
                    on_receipt(ev[1], ev[2], ev[3])
            for iv in intervals.values():
                if iv.pending is not None and iv.outcome == "void":
                    ray.cancel(iv.pending)
                    iv.pending = None
                elif iv.pending is not None:
                    ready, _ = ray.wait([iv.pending], timeout=0)
                    if ready:
                        ref, iv.pending = iv.pending, None
                        on_replay(iv, ray.get(ref))
            close_epochs(force=False)
            if not run.alive() and not any(iv.pending is not None for iv in intervals.values()):
                break
            time.sleep(POLL_INTERVAL_S)
        run.join()
        for ev in ray.get(inbox.poll.remote()):
            if ev[0] == "receipt":
                on_receipt(ev[1], ev[2], ev[3])
        train_s = time.monotonic() - start_wall
        ui.training_done()
        # The local cluster's epoch ends when it stops: close it so the demo's work is rewarded.
        close_epochs(force=True)

    ui.status("evaluating the trained model")
    done = [iv.end for iv in intervals.values() if len(iv.receipts) == spec.workers]
    last_step = max(done, default=0)
    val_loss, sample = _evaluate(loaded, module, corpus, ckpt_dir, last_step)
    unsettled = [f"{iv.start}-{iv.end}" for iv in intervals.values() if iv.outcome == "pending" or (iv.outcome == "open" and fraud["at"] is None)]
    return {
        "job_id": job_id,
        "val_loss": val_loss,
        "uniform_loss": math.log(corpus.vocab_size),
        "steps": last_step,
        "stopped": fraud["reason"],
        "workers": spec.workers,
        "sample": sample,
        "receipts": {k: counts[k] for k in ("signed", "checked", "passed", "failed")},
        "intervals": [{"steps": [iv.start, iv.end], "outcome": iv.outcome, "wall_ms": iv.wall_ms} for iv in intervals.values()],
        "unsettled_intervals": unsettled,
        "max_replay_distance": max(distances, default=None),
        "price_ugpc_per_worker_hour": placement.price_ugpc_per_worker_hour,
        "ledger": {k: money[k] for k in ("escrowed", "paid", "burned", "treasury", "minted", "slashed")},
        "timings_s": {"cluster_start": round(cluster_s, 1), "training": round(train_s, 1)},
    }


def _host_gpu_count() -> int:
    """CUDA GPUs on this host (0 without CUDA); each local volunteer node gets one while they last."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for us, not a failed job
        return 0


def _last_minted_epoch(ledger: Ledger) -> int:
    last = -1
    for row in ledger.messages("Settlement"):
        msg = json.loads(row.typed_data)["message"]
        if int(msg["minted"]) > 0:
            last = max(last, int(msg["epoch"]))
    return last


def _evaluate(loaded: LoadedSpec, module, corpus, ckpt_dir: Path, step: int) -> tuple[float, str]:
    """Validation loss (nats/char, mean over ``eval_batches``) and ~300 generated characters."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gpucoin.runtime.data_order import eval_offsets, micro_batch

    spec = loaded.spec
    if spec.deepspeed.zero_stage == 0:  # not a ZeRO checkpoint: the module's state dict is whole
        state = torch.load(ckpt_dir / tag_for(step) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed prints per shard
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag_for(step))
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    model.load_state_dict(state, strict=False)
    model.eval()
    T, B = spec.model.block_size, spec.deepspeed.micro_batch_size
    losses = []
    with torch.no_grad():
        for i in range(spec.eval_batches):
            x, y = micro_batch(corpus.val, eval_offsets(spec.seed, i, B, len(corpus.val), T), T)
            losses.append(model(x, y)[1].item())
        g = torch.Generator().manual_seed(spec.seed)
        start = torch.tensor([corpus.encode("\n")], dtype=torch.long)
        out = model.generate(start, 300, temperature=0.8, top_k=None, generator=g)
    return float(np.mean(losses)), corpus.decode(out[0, 1:].tolist())
