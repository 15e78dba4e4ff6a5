"""One job in the embedded local mode, end to end (SPEC.md, Flow of one job).

spec -> preflight (nothing written) -> dev wallets, faucet, volunteers bond and register ->
JobOrder signed, budget escrowed -> local Ray cluster -> market clears -> ranks placed on the
chosen nodes -> per interval: receipts checked and recorded, draw, replay on the verifier
node, verdict -> settlement (burn, treasury; slash on fraud) -> epochs close and mint ->
refund -> final evaluation -> audit -> summary.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gpucoin.cluster.auth import home_token_path
from gpucoin.cluster.build_cache import build_root, clear_stale_locks
from gpucoin.cluster.embedded import EmbeddedCluster, NodeSpec, short_temp_dir, sigint_ignored
from gpucoin.cluster.local import engineer_available_after_faucet, fund_engineer, participant, register_volunteer
from gpucoin.cluster.node_user import (
    NODE_USER,
    NodeUser,
    chown_tree,
    kill_processes,
    node_dir,
    prepare_node_user,
    switching_users,
)
from gpucoin.coordinator.jobcode import corpus_info
from gpucoin.coordinator.settle import Coordinator, genesis_message
from gpucoin.exceptions import (
    InsufficientFunds,
    JobCodeError,
    NoPlacement,
    PolicyError,
    StoredPolicyOutdated,
    VerificationError,
)
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.money import format_gpc
from gpucoin.policy.model import Policy, policy_hash
from gpucoin.scheduler.market import Offer, Order, clear
from gpucoin.spec import LoadedSpec
from gpucoin.storage import ContentStore
from gpucoin.wallet.messages import Domain, sign
from gpucoin.wallet.signer import socket_dir_for

JOB_ORDER_TTL_S = 3600


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


def new_job_id(name: str) -> str:
    """A job id: the spec name, the UTC time and 4 random hex digits."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


@dataclass
class NodeSetup:
    """Who the nodes (and the head's job-code children) run as, and the directories they write.

    As root: the node user (``cluster.node_user``) and a working dir of ours holding one it owns
    (``node_dir``) for the checkpoint store, Ray Train's run dir and a copy of the corpus file;
    ``keep`` copies the regular files of the store and run dir into the job's directory (which the
    node user cannot reach) once the cluster has stopped and every process of that user has ended.
    Otherwise: this user, and everything in the job's directory.

    Attributes:
        user: the node user, or None; work: our working dir, or None; node_area: the node user's dir in it.
    """

    user: NodeUser | None = None
    work: Path | None = None
    node_area: Path | None = None

    @classmethod
    def prepare(cls, ui: "UI") -> "NodeSetup":
        """The node user when root (created and let reach the runtime: ``prepare_node_user``);
        stale build locks in the nodes' torch extension cache removed (``build_cache``)."""
        if not switching_users():
            cls._clear_build_locks(ui, build_root(os.environ, Path.home()), os.getuid())
            return cls()
        ui.status(f"preparing OS user {NODE_USER} for Ray's node processes")
        user, widened = prepare_node_user()
        if widened:
            ui.note(
                f"gave OS user {user.name} search permission (an ACL entry: no listing, no reading) on "
                f"{', '.join(map(str, widened))} so that it can run Python and gpucoin"
            )
        if kill_processes(user):
            ui.note(f"ended processes of OS user {user.name} left from an earlier run")
        cls._clear_build_locks(ui, build_root(user.env(), user.home), user.uid)
        work = short_temp_dir("gpucoin-work-")
        ui.note(f"job code runs as OS user {user.name}, apart from the signing processes and this one")
        return cls(user, work, node_dir(work, user))

    @staticmethod
    def _clear_build_locks(ui: "UI", root: Path, uid: int) -> None:
        for lock in clear_stale_locks(root, uid):
            ui.note(f"removed {lock}, left by an interrupted DeepSpeed op build (no process held it)")

    def stage(self, source: str) -> str:
        """The corpus source the nodes get: a file copied where the node user can read it."""
        if self.node_area is None or source == "pypi":
            return source
        dest = self.node_area / "data" / Path(source).name
        dest.parent.mkdir()
        shutil.copyfile(source, dest)
        chown_tree(dest.parent, self.user)  # type: ignore[arg-type]
        return str(dest)

    def store_dir(self, job_dir: Path) -> Path:
        """Where the store actor keeps the job's checkpoints while the cluster runs."""
        return job_dir / "store" if self.node_area is None else self.node_area / "store"

    def train_dir(self, job_dir: Path) -> Path:
        """Ray Train's run directory while the cluster runs."""
        return job_dir / "ray_train" if self.node_area is None else self.node_area / "ray_train"

    def keep(self, job_dir: Path) -> None:
        """Copy the regular files the nodes wrote into ``job_dir``, never following a link
        (after the cluster has stopped, so no process of the node user runs)."""
        if self.node_area is None:
            return
        kill_processes(self.user)  # type: ignore[arg-type]
        for name in ("store", "ray_train"):
            copy_regular_files(self.node_area / name, job_dir / name)

    def close(self) -> None:
        """End every process of the node user and remove the working dir."""
        if self.user is not None:
            kill_processes(self.user)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = self.node_area = None


def copy_regular_files(src: Path, dest: Path) -> None:
    """Copy every regular file under ``src`` to the same place under ``dest``; links, FIFOs and
    devices are skipped, never followed or opened (``src`` is a directory another user wrote)."""
    if src.is_symlink() or not src.is_dir():
        return
    for root, _, files, root_fd in os.fwalk(src, follow_symlinks=False):
        for name in files:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root_fd)
            except OSError:
                continue  # a link, or gone
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    continue
                out = dest / Path(root).relative_to(src) / name
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("wb") as g:
                    shutil.copyfileobj(f, g)


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
    offers = [
        Offer(f"vol{i}", f"vol{i}", opts.ask_ugpc_per_worker_hour, 1, opts.stake_ugpc) for i in range(opts.volunteers)
    ]
    order = Order(spec.name, spec.bid_ugpc_per_worker_hour, spec.workers, 1, 0.0)
    result = clear([order], offers, opts.policy.market)
    if not result.placements:
        raise NoPlacement(
            f"job {spec.name!r} cannot be placed on {opts.volunteers} local volunteers: {result.unplaced[spec.name]}"
        )
    have = engineer_available_after_faucet(coord, engineer)
    if spec.budget_ugpc > have:
        raise InsufficientFunds(
            f"budget {format_gpc(spec.budget_ugpc)} GPC exceeds the {format_gpc(have)} GPC available in the engineer's wallet {engineer.address}"
        )


def open_ledger(opts: LocalOptions, coordinator) -> Ledger:
    """The local market's ledger (SQLite under ``home``), with a dev Genesis on first use.

    The Genesis is signed by the local coordinator key for ``opts.policy``; a ledger kept from an
    earlier run must name the same policy. A local ledger written before Genesis messages existed
    is moved aside (``ledger-before-genesis-<time>.db``) and a new one started, and so is one of an
    older version of the same named policy (``ledger-<name>-v<version>-<time>.db``): the local
    market holds only dev money, and a shipped policy's upgrade must not stop ``make demo``.

    Raises:
        PolicyError: the local ledger's Genesis names another policy than ``opts.policy``.
        LedgerError: the ledger cannot be opened, or belongs to another market.
    """
    opts.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = opts.home / "ledger.db"
    domain = Domain(chain_id=opts.policy.chain_id, verifying_contract=coordinator.address)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        ledger = Ledger(f"sqlite:///{path}", domain=domain)
    except StoredPolicyOutdated:
        # bound to a policy of an older schema: a dev market, kept aside, and a new one begun
        _move_aside(path, path.with_name(f"ledger-older-policy-schema-{stamp}.db"))
        ledger = Ledger(f"sqlite:///{path}", domain=domain)
    if ledger.genesis is None and (ledger.domain is not None or ledger.messages()):
        ledger.close()
        _move_aside(path, path.with_name(f"ledger-before-genesis-{stamp}.db"))
        ledger = Ledger(f"sqlite:///{path}", domain=domain)
    elif ledger.genesis is not None and ledger.genesis.policy_hash != policy_hash(opts.policy):
        bound = ledger.policy
        if bound.name == opts.policy.name and bound.version < opts.policy.version:
            ledger.close()  # a dev market of an older version of the same policy: kept, a new one begun
            _move_aside(path, path.with_name(f"ledger-{bound.name}-v{bound.version}-{stamp}.db"))
            ledger = Ledger(f"sqlite:///{path}", domain=domain)
    if ledger.genesis is None:
        ledger.init_genesis(genesis_message(coordinator.account, domain, opts.policy, dev=True), opts.policy)
    elif ledger.genesis.policy_hash != policy_hash(opts.policy):
        bound = ledger.policy
        ledger.close()
        raise PolicyError(
            f"the local ledger {path} was started with policy {bound.name!r} v{bound.version}, not "
            f"{opts.policy.name!r} v{opts.policy.version}; use --home DIR for a local market with this policy"
        )
    return ledger


def _move_aside(path: Path, aside: Path) -> None:
    """Rename a SQLite ledger file and its WAL companions to ``aside``."""
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            Path(f"{path}{suffix}").rename(f"{aside}{suffix}")


def train_local(loaded: LoadedSpec, opts: LocalOptions, ui: UI | None = None) -> dict:
    """Run ``loaded`` on an embedded local cluster and return the summary.

    The summary (also what ``--summary-json`` writes) has: job_id, val_loss (nats/char, of the
    checkpoint after ``steps``; None if it could not be loaded) and uniform_loss, steps (the end
    of the last interval settled without a gap from step 0: the checkpoint the job vouches for),
    workers, stopped (why the job stopped early, or None), sample (generated text), receipts
    {signed, checked, passed, failed, void, rejected},
    intervals [{steps, outcome, wall_ms}], unsettled_intervals, max_replay_distance,
    price_ugpc_per_worker_hour, ledger {escrowed, paid, burned, treasury, minted, slashed, refunded,
    supply, total_minted, total_burned} in µGPC, accounts {name: {before, after, change}} in µGPC,
    audit ("ok" or the list of problems) and timings_s.

    Raises:
        GpucoinError subclasses for bad input (before any ledger change), ClusterError,
        TrainingError. On any failure after the escrow, what is left in escrow is refunded.
    """
    ui = ui or QuietUI()
    spec = loaded.spec
    policy = opts.policy
    home = opts.home
    coordinator_p = participant("coordinator", home)
    engineer = participant("engineer", home)
    ledger = open_ledger(opts, coordinator_p)
    domain = ledger.domain
    stack = contextlib.ExitStack()
    try:
        coord = Coordinator(ledger, policy, coordinator_p.account, domain)
        preflight(loaded, opts, coord, engineer)

        nodes = NodeSetup.prepare(ui)
        stack.callback(nodes.close)
        ui.status("preparing the corpus")
        source = nodes.stage(_data_source(loaded))
        # the job's code runs in a child process, never in this one (it holds the coordinator's key)
        corpus = corpus_info(loaded.module_dir.parent, spec.model_dump(mode="json"), source, user=nodes.user)

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
                "packageHash": loaded.package_hash,
                "workers": spec.workers,
                "bidPerWorkerHour": spec.bid_ugpc_per_worker_hour,
                "budget": spec.budget_ugpc,
                "nonce": coord.nonces.next(),
                "deadline": int(time.time()) + JOB_ORDER_TTL_S,
            },
        )
        coord.escrow(order)
        try:
            summary = _run(loaded, opts, ui, coord, order, job_id, job_dir, volunteers, verifier, corpus, source, nodes)
        finally:
            with sigint_ignored():  # a second Ctrl-C must not leave the budget in escrow
                refunded = coord.refund(job_id, order)
        summary["ledger"]["refunded"] = refunded
        after = ledger.balances()
        summary["accounts"] = {
            a: {"before": before.get(a, 0), "after": after.get(a, 0), "change": after.get(a, 0) - before.get(a, 0)}
            for a in sorted(set(before) | set(after))
            if after.get(a, 0) != before.get(a, 0)
        }
        totals = ledger.totals()
        summary["ledger"].update(
            {"supply": totals["supply"], "total_minted": totals["minted"], "total_burned": totals["burned"]}
        )
        problems = ledger.audit()
        summary["audit"] = "ok" if not problems else problems
        return summary
    finally:
        stack.close()
        ledger.close()


def _run(loaded, opts, ui, coord, order, job_id, job_dir, volunteers, verifier, corpus, source, nodes) -> dict:
    """Start the nodes' signing processes, then run the job on a fresh embedded cluster."""
    with contextlib.ExitStack() as stack:
        # each node's key lives in its own signing process, outside Ray; its socket dir is ours
        # only, or searchable by the node user's group, whose processes alone the signer serves
        sockets = socket_dir_for(short_temp_dir("gpucoin-sign-"), nodes.user)
        stack.callback(shutil.rmtree, sockets, True)
        signers = {}
        for p in [*volunteers, verifier]:
            role = "verifier" if p is verifier else "volunteer"
            tolerance = opts.policy.verification.tolerance_rel_l2 if p is verifier else None
            signers[p.name] = p.start_signer(
                sockets / f"{p.name}.sock", coord.account.address, coord.domain, role, tolerance, nodes.user
            )
            stack.callback(signers[p.name].stop)
        return _run_on_cluster(
            loaded, opts, ui, coord, order, job_id, job_dir, volunteers, verifier, corpus, source, nodes, signers
        )


def _run_on_cluster(
    loaded, opts, ui, coord, order, job_id, job_dir, volunteers, verifier, corpus, source, nodes, signers
) -> dict:
    import ray

    from gpucoin.coordinator.evaluate import rebuilt_checkpoint
    from gpucoin.coordinator.jobcode import evaluate_in_child
    from gpucoin.coordinator.run import JobRun
    from gpucoin.runtime.channel import ActorInbox, RayChannel, RayReplays
    from gpucoin.runtime.inbox import InboxConfig, JobInbox
    from gpucoin.runtime.trainer import launch
    from gpucoin.verify.verifier import check_interval

    spec, policy, ledger = loaded.spec, opts.policy, coord.ledger
    host_gpus = _host_gpu_count()
    node_specs = [
        NodeSpec(
            p.name,
            1,
            {**p.node_env(signers[p.name]), **opts.node_env.get(p.name, {})},
            gpu=i if i < host_gpus and p in volunteers else None,
        )
        for i, p in enumerate([*volunteers, verifier])
    ]
    ui.status(f"starting a local Ray cluster: head + {len(volunteers)} volunteers + 1 verifier")
    t0 = time.monotonic()
    with EmbeddedCluster(
        job_dir / "logs",
        node_specs,
        head_port=opts.head_port,
        runtime_env={"py_modules": [str(loaded.module_dir)]},
        auth_token_path=home_token_path(opts.home),
        node_user=nodes.user,
    ) as cluster:
        cluster_s = time.monotonic() - t0
        if nodes.user is None:
            ui.note(
                f"job code runs as OS user {getpass.getuser()}, as the nodes' signing processes and this one do: "
                f"no key is in its environment, but it can read this user's files (the dev keystores under "
                f"{opts.home / 'wallets'}); run as root for a node user of its own; see docs/security.md"
            )
        for v in volunteers:
            register_volunteer(coord, v, cluster.node_id(v.name), opts.ask_ugpc_per_worker_hour, opts.stake_ugpc)
        offers = [
            Offer(
                cluster.node_id(v.name),
                v.address,
                opts.ask_ugpc_per_worker_hour,
                1,
                ledger.balance(wallet_account(v.address, "bonded")),
            )
            for v in volunteers
        ]
        result = clear(
            [Order(job_id, spec.bid_ugpc_per_worker_hour, spec.workers, 1, time.time())], offers, policy.market
        )
        if not result.placements:
            raise NoPlacement(f"job {job_id} could not be placed: {result.unplaced[job_id]}")
        placement = result.placements[0]
        provider_of = {o.node_id: o.provider for o in offers}
        name_of = {cluster.node_id(v.name): v.name for v in volunteers}
        ui.note(
            f"market: job {job_id} placed on {', '.join(name_of[n] for n in placement.node_ids)} "
            f"at {format_gpc(placement.price_ugpc_per_worker_hour)} GPC/worker-hour (bid {spec.bid_gpc_per_worker_hour})"
        )
        assignments = [
            coord.assign(job_id, rank, provider_of[node_id], node_id).to_json()
            for rank, node_id in enumerate(placement.node_ids)
        ]
        rank_worker = [provider_of[n] for n in placement.node_ids]
        inbox_config = InboxConfig(
            job_id=job_id,
            domain=coord.domain.as_dict(),
            rank_worker=tuple(rank_worker),
            steps_per_interval=spec.checkpoint_interval_steps,
            buckets=policy.verification.sketch_buckets,
            total_steps=spec.steps,
        )
        inbox = (
            ray.remote(JobInbox)
            .options(num_cpus=0, label_selector={"ray.io/node-id": cluster.node_id("head")})
            .remote(inbox_config)
        )
        # checkpoints live write-once under the head's control, named by hash (gpucoin.storage)
        store = (
            ray.remote(ContentStore)
            .options(num_cpus=0, max_concurrency=4, label_selector={"ray.io/node-id": cluster.node_id("head")})
            .remote(str(nodes.store_dir(job_dir)))
        )
        if loaded.package_hash not in policy.verification.vetted_packages:
            ui.note(
                f"the job's package {loaded.package_hash[:10]}… is not on the policy's vetted list: a replay "
                "mismatch slashes nobody, the interval is void and its charge to you is burned"
            )
        channel = RayChannel(inbox, store)
        job = JobRun(
            spec=spec,
            job_id=job_id,
            coord=coord,
            inbox=ActorInbox(inbox),
            rank_worker=rank_worker,
            price_ugpc_per_worker_hour=placement.price_ugpc_per_worker_hour,
            verifier_address=verifier.address,
            package_hash=loaded.package_hash,
            replays=RayReplays(
                ray.remote(num_cpus=1, max_retries=0)(check_interval).options(
                    label_selector={"ray.io/node-id": cluster.node_id(verifier.name)}
                ),
                channel,
            ),
            store=channel,
            sketch_dir=job_dir / "sketches",
            data_source=source,
            ui=ui,
            assignments=tuple(assignments),
            secret=opts.seed_secret,
        )
        t1 = time.monotonic()
        training = launch(
            spec,
            job_id=job_id,
            node_ids=list(placement.node_ids),
            channel=channel,
            storage_dir=nodes.train_dir(job_dir),
            buckets=policy.verification.sketch_buckets,
            data_source=source,
            assignments=assignments,
        )
        cluster.track_driver_thread(training.thread)
        try:
            job.run(training)
        finally:
            ui.training_done()
        train_s = time.monotonic() - t1
        # The local cluster's challenge window and epoch end when it stops: settle and mint now.
        job.finish()

    nodes.keep(job_dir)
    last_step = job.last_settled_step()
    ui.status("evaluating the trained model")
    try:
        manifests = job.end_manifests(last_step)
        with rebuilt_checkpoint(spec, ContentStore(job_dir / "store").get, job_id, manifests, last_step) as tag_dir:
            ev = evaluate_in_child(
                loaded.module_dir.parent, spec.model_dump(mode="json"), source, tag_dir, last_step, user=nodes.user
            )
        val_loss, sample = ev.val_loss, ev.sample
    except (VerificationError, JobCodeError) as e:  # e.g. a checkpoint a rank signed that the safe load refuses
        val_loss, sample = None, f"(no evaluation: {e})"
    return {
        "job_id": job_id,
        "val_loss": val_loss,
        "uniform_loss": math.log(corpus.vocab_size),
        "steps": last_step,
        "workers": spec.workers,
        "stopped": job.stopped,
        "sample": sample,
        "receipts": {k: job.counts[k] for k in ("signed", "checked", "passed", "failed", "void", "rejected")},
        "intervals": [
            {"steps": [iv.start, iv.end], "outcome": iv.outcome, "wall_ms": iv.wall_ms} for iv in job.intervals.values()
        ],
        "unsettled_intervals": [
            f"{iv.start}-{iv.end}" for iv in job.intervals.values() if iv.outcome in ("pending", "held")
        ],
        "max_replay_distance": max(job.distances, default=None),
        "price_ugpc_per_worker_hour": placement.price_ugpc_per_worker_hour,
        "ledger": {k: job.money[k] for k in ("escrowed", "paid", "burned", "treasury", "minted", "slashed")},
        "timings_s": {"cluster_start": round(cluster_s, 1), "training": round(train_s, 1)},
    }


def _host_gpu_count() -> int:
    """CUDA GPUs on this host (0 without CUDA); each local volunteer node gets one while they last."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for us, not a failed job
        return 0
