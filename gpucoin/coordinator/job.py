"""One job in the embedded local mode, end to end (SPEC.md, Flow of one job), on the head's path.

spec -> preflight (nothing written) -> dev wallets funded on the local ledger -> ``gpucoin up``
(a private head from ``--home``) -> ``gpucoin join`` of the volunteers (their stake bonded) and
of a verifier -> the JobOrder submitted as ``gpucoin train --address`` does (budget escrowed) ->
the head's market places it, its ranks train, their receipts are checked and settled, drawn
intervals replayed on the verifier, epochs closed, escrow refunded, the final checkpoint
evaluated -> nodes leave, head down -> audit -> summary. There is one way a job runs; here
every party of it is on this host.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gpucoin.cluster.auth import home_token_path
from gpucoin.cluster.build_cache import build_root, clear_stale_locks
from gpucoin.cluster.embedded import NODE_IP, short_temp_dir, sigint_ignored
from gpucoin.cluster.local import Participant, engineer_available_after_faucet, fund_engineer, participant
from gpucoin.cluster.node_user import (
    NODE_USER,
    NodeUser,
    chown_tree,
    kill_processes,
    prepare_node_user,
    switching_users,
)
from gpucoin.coordinator.settle import Coordinator, genesis_message
from gpucoin.exceptions import InsufficientFunds, NoPlacement, PolicyError, SpecError, StoredPolicyOutdated
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.money import format_gpc
from gpucoin.policy.model import Policy, policy_hash
from gpucoin.scheduler.market import Offer, Order, clear
from gpucoin.spec import LoadedSpec, spec_digest
from gpucoin.wallet.keystore import DEV_PASSWORD
from gpucoin.wallet.messages import Domain


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
        verifiers: verifier Ray nodes to start (``verifier0``...); with two or more, a policy with a
            ``recheck_share_bps`` has a second verifier re-check the first (``verify.recheck``).
        stake_ugpc: bond of each dev volunteer and verifier, µGPC.
        ask_ugpc_per_worker_hour: ask of each dev volunteer, µGPC per worker-hour.
        head_port: GCS port of the local head (None: a free one).
        node_env: extra environment per node name (``vol0``...), e.g. test fault injection.
        cheat: ``REF@RANK`` (``runtime.faults.FAULT_CHEAT_ENV``): the rank of that number cheats
            as the cheat ``REF`` says (``runtime.cheats``), on whichever volunteer it is placed.
    """

    policy: Policy
    home: Path = field(default_factory=lambda: Path.home() / ".gpucoin" / "local")
    volunteers: int = 2
    verifiers: int = 1
    stake_ugpc: int = 500_000_000
    ask_ugpc_per_worker_hour: int = 800_000
    head_port: int | None = None
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    cheat: str | None = None


def new_job_id(name: str) -> str:
    """A job id: the spec name, the UTC time and 4 random hex digits."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


@dataclass
class NodeSetup:
    """Who the nodes (and the head's job-code children) run as, and where they read the corpus.

    As root: the node user (``cluster.node_user``) and a working dir of ours (0711: it may only
    search it) holding a copy of each job's corpus file in a dir it owns. Otherwise: this user, and
    the corpus where it is.

    Attributes:
        user: the node user, or None; work: our working dir, or None.
    """

    user: NodeUser | None = None
    work: Path | None = None

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
        os.chmod(work, 0o711)
        return cls(user, work)

    @staticmethod
    def _clear_build_locks(ui: "UI", root: Path, uid: int) -> None:
        for lock in clear_stale_locks(root, uid):
            ui.note(f"removed {lock}, left by an interrupted DeepSpeed op build (no process held it)")

    def stage(self, source: str) -> str:
        """The corpus source the nodes get: a file copied where the node user can read it (a
        directory of its own per call, so that two jobs' corpora never meet)."""
        if self.work is None or source == "pypi":
            return source
        # made, filled and only then given away in our own dir (0711), which the node user's
        # processes of an earlier job cannot rename or plant a link in
        dest = Path(tempfile.mkdtemp(prefix="data-", dir=self.work)) / Path(source).name
        shutil.copyfile(source, dest)
        chown_tree(dest.parent, self.user)  # type: ignore[arg-type]
        return str(dest)

    def close(self) -> None:
        """End every process of the node user and remove the working dir."""
        if self.user is not None:
            kill_processes(self.user)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None


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
        SpecError: a corpus file that is not a readable file.
    """
    spec = loaded.spec
    source = _data_source(loaded)
    if source != "pypi" and not (os.path.isfile(source) and os.access(source, os.R_OK)):
        raise SpecError(f"data.source {source}: no readable file there")
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
    """Run ``loaded`` on a private head of this host and return the summary.

    The embedded mode is the head's path with every party on this host (SPEC.md, Roles): every
    check that can refuse the job runs first (``preflight``: nothing is written if it refuses);
    then a ``LocalMarket`` starts (dev wallets funded on the local ledger, ``gpucoin up`` of a head
    from ``opts.home``, ``gpucoin join`` of ``opts.volunteers`` volunteer nodes and one verifier),
    the engineer's wallet submits the job to it as ``gpucoin train --address`` does and follows it
    to its end (``LocalMarket.run``); then the nodes leave (their stake stays bonded for the next
    run) and the head goes down.

    Returns:
        The summary (``LocalMarket.run``), its ``accounts`` counted from before the dev wallets
        were funded.

    Raises:
        GpucoinError subclasses for bad input (before any ledger change); HeadError /
        ClusterError when the head or a node does not start; NoPlacement when the market does not
        place the job within ``PLACEMENT_TIMEOUT_S``; TrainingError when the job failed (its
        reason). On any failure or interrupt after the escrow, everything started is stopped and
        what is left in escrow is refunded.
    """
    market = LocalMarket(opts, ui)  # its dev wallets; nothing else happens before it is entered
    ledger = open_ledger(opts, market.coordinator)
    try:
        coord = Coordinator(ledger, opts.policy, market.coordinator.account, ledger.domain)
        preflight(loaded, opts, coord, market.engineer)
        before = ledger.balances()
    finally:
        ledger.close()
    with market:
        return market.run(loaded, before=before)


PLACEMENT_TIMEOUT_S = 120.0
"""How long the embedded mode waits for its head's market to place the job on its own nodes."""


class LocalMarket:
    """The embedded mode's market: a private dev head of this host with its nodes; a context
    manager that tests also hold open across several jobs.

    Entering it funds the dev wallets on the local ledger before anything runs (the engineer's
    one-time grant; each volunteer topped up so that its join can bond ``opts.stake_ugpc``),
    prepares the node user (``NodeSetup``), runs ``gpucoin up --dev`` from ``opts.home`` (Ray head
    and head service on free loopback ports) and ``gpucoin join`` of ``opts.volunteers`` volunteers
    (``vol0``...) and one verifier (``verifier0``), each its own Ray node and signing process with
    ``opts.node_env`` of its name. ``run`` runs one job on it. Leaving it (or a failure while
    entering) undoes exactly what was started: the nodes leave (their stake stays bonded), the head
    goes down, and then each job ``run`` submitted that did not end is failed and refunded by this
    process (``head.scheduler.settle_lost_jobs``).

    Raises (entering):
        HeadError / ClusterError: the head or a node does not start.
    """

    def __init__(self, opts: LocalOptions, ui: UI | None = None):
        self.opts, self.ui = opts, ui or QuietUI()
        home = opts.home
        self.coordinator = participant("coordinator", home)
        self.engineer = participant("engineer", home)
        self.volunteers = [participant(f"vol{i}", home) for i in range(opts.volunteers)]
        self.verifiers = [participant(f"verifier{i}", home) for i in range(opts.verifiers)]
        self.verifier = self.verifiers[0]
        self.nodes = NodeSetup()
        self.info = None
        self.head_down = False
        self.joined: list[str] = []
        self.submitted: list[str] = []
        self.cluster_start_s = 0.0

    def __enter__(self) -> "LocalMarket":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from gpucoin.cluster.embedded import PortPool
        from gpucoin.cluster.join import JoinOptions, join
        from gpucoin.head.lifecycle import UpOptions, up
        from gpucoin.runtime.faults import FAULT_CHEAT_ENV

        opts, ui, home = self.opts, self.ui, self.opts.home
        ledger = open_ledger(opts, self.coordinator)
        try:
            coord = Coordinator(ledger, opts.policy, self.coordinator.account, ledger.domain)
            fund_engineer(coord, self.engineer)
            # verifiers bond like volunteers: a report a re-check shows false is slashed from it
            stakes = {v.name: fund_volunteer(coord, v, opts.stake_ugpc) for v in [*self.volunteers, *self.verifiers]}
        finally:
            ledger.close()
        self.nodes = NodeSetup.prepare(ui)
        t0 = time.monotonic()
        ui.status(
            f"starting a local head (Ray head + head service) and {len(self.volunteers)} volunteers + "
            f"{len(self.verifiers)} verifier(s)"
        )
        ports = PortPool()
        self.info = up(
            UpOptions(
                home=home,
                dev=True,
                policy=opts.policy.name,
                host=NODE_IP,
                ray_port=opts.head_port or ports.take(),
                api_port=ports.take(),
            )
        )
        if self.nodes.user is None:
            ui.note(
                f"job code runs as OS user {getpass.getuser()}, as the nodes' signing processes and this one do: "
                f"no key is in its environment, but it can read this user's files (the dev keystores under "
                f"{home / 'wallets'}); run as root for a node user of its own; see docs/security.md"
            )
        host_gpus = _host_gpu_count()
        for i, p in enumerate([*self.volunteers, *self.verifiers]):
            role = "verifier" if p in self.verifiers else "volunteer"
            gpu = role == "volunteer" and i < host_gpus
            join(
                JoinOptions(
                    api_url=self.info.api_url,
                    keystore=p.keystore,
                    password=DEV_PASSWORD,
                    stake_ugpc=stakes.get(p.name, 0),
                    ask_ugpc_per_worker_hour=opts.ask_ugpc_per_worker_hour,
                    gpus=1 if gpu else 0,
                    host=NODE_IP,
                    name=p.name,
                    token_file=home_token_path(home),
                    home=home,
                    role=role,
                    env={
                        **({"CUDA_VISIBLE_DEVICES": str(i)} if gpu else {}),
                        **({FAULT_CHEAT_ENV: opts.cheat} if opts.cheat and role == "volunteer" else {}),
                        **opts.node_env.get(p.name, {}),
                    },
                )
            )
            self.joined.append(p.name)
        self.cluster_start_s = time.monotonic() - t0

    def run(self, loaded: LoadedSpec, before: dict[str, int] | None = None, job_id: str | None = None) -> dict:
        """Submit ``loaded`` from the engineer's wallet as ``gpucoin train --address`` does (its
        package, the signed JobOrder, the escrow) and follow it to its end.

        Args:
            before: the balances the summary's ``accounts`` are counted from (None: the ledger's now).
            job_id: the job's id (None: ``new_job_id``).

        Returns:
            The summary (also what ``--summary-json`` writes): job_id, state, val_loss (nats/char, of
            the checkpoint after ``steps``; None if it could not be evaluated) and uniform_loss, steps
            (the end of the last interval settled without a gap from step 0: the checkpoint the job
            vouches for), workers, stopped (why the job stopped early, or None), sample (generated
            text), receipts {signed, checked, passed, failed, void, rejected}, intervals [{steps,
            outcome, wall_ms, check_probability, and for a failed one ranks: the convicted ranks}], nodes {worker address: {passed, other,
            clean_streak, check_probability}} (its verification record over every job, after this
            one), unsettled_intervals, max_replay_distance,
            price_ugpc_per_worker_hour, ledger {escrowed, paid, burned, treasury, minted, slashed,
            refunded, supply, total_minted, total_burned} in µGPC, accounts {name: {before, after,
            change}} in µGPC, audit ("ok" or the list of problems) and timings_s.

        Raises:
            HeadError: the head refused the job (its one-line reason). NoPlacement: not placed
            within ``PLACEMENT_TIMEOUT_S``. TrainingError: the job failed before any work was done.
        """
        from gpucoin.head.records import JobState
        from gpucoin.head.submit import events_to_ui, follow, submit

        ui, opts = self.ui, self.opts
        job_id = job_id or new_job_id(loaded.spec.name)
        ui.status("preparing the corpus")
        loaded = with_data_source(loaded, self.nodes.stage(_data_source(loaded)))
        if before is None:
            with Ledger(f"sqlite:///{opts.home / 'ledger.db'}") as ledger:
                before = ledger.balances()
        ui.status("submitting the job: its package, the signed JobOrder, the escrow")
        self.submitted.append(job_id)  # from here on the escrow may be taken, even if the answer is lost
        view = submit(self.info.api_url, loaded, self.engineer.account, job_id=job_id)
        t1 = time.monotonic()

        def on_view(v) -> None:
            if v.state == JobState.QUEUED and time.monotonic() - t1 > PLACEMENT_TIMEOUT_S:
                raise NoPlacement(f"job {v.job_id} was not placed within {PLACEMENT_TIMEOUT_S:.0f} s: {v.reason}")

        try:
            final = follow(self.info.api_url, view.job_id, on_event=events_to_ui(ui), on_view=on_view)
        finally:
            ui.training_done()
        timings = {"cluster_start": round(self.cluster_start_s, 1), "training": round(time.monotonic() - t1, 1)}
        return _summary(final, loaded, opts, before, timings)

    def close(self) -> None:
        """Undo what was started, each step whatever the others did (a second Ctrl-C ignored): the
        nodes leave, the head goes down, the node user's processes end, and then, the head being
        down, the jobs it left unfinished are failed and refunded."""
        from gpucoin.cluster.join import leave
        from gpucoin.head.lifecycle import down

        ui, home = self.ui, self.opts.home
        with sigint_ignored():  # a second Ctrl-C must not leave a node running or the budget in escrow
            while self.joined:  # the stake stays bonded for the next run
                name = self.joined.pop()
                _quietly(ui, f"stopping node {name}", leave, home, name, None)
            if self.info is not None and not self.head_down:
                try:
                    down(home)
                    self.head_down = True
                except Exception as e:  # noqa: BLE001 - said; the jobs stay the head's to settle
                    ui.note(f"stopping the local head failed: {type(e).__name__}: {e}; `gpucoin down --home {home}`")
            _quietly(ui, "ending the node user's processes", self.nodes.close)
            if self.submitted and self.head_down:
                _quietly(
                    ui, "refunding the job's escrow", _settle_own_jobs, self.opts, self.coordinator, self.submitted
                )
                self.submitted = []


def _quietly(ui: UI, what: str, fn, *args) -> None:
    """``fn(*args)`` as one step of a clean-up: an error is said, and the clean-up (and the error
    that started it, if any) goes on."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the next clean-up step and the first error matter more
        ui.note(f"{what} failed: {type(e).__name__}: {e}")


def fund_volunteer(coord: Coordinator, vol: Participant, stake_ugpc: int) -> int:
    """Top a dev volunteer's wallet up from the dev faucet so that it can bond up to
    ``stake_ugpc``; return the stake its join is to bond (µGPC; 0 when an earlier run's bond
    already holds ``stake_ugpc``)."""
    bonded = coord.ledger.balance(wallet_account(vol.address, "bonded"))
    stake = max(0, stake_ugpc - bonded)
    short = stake - coord.ledger.balance(wallet_account(vol.address))
    if short > 0:
        coord.faucet(vol.address, short, f"faucet:{vol.address}:{secrets.token_hex(8)}")
    return stake


def with_data_source(loaded: LoadedSpec, source: str) -> LoadedSpec:
    """``loaded`` with its corpus at ``source`` (the spec validated again), and the spec hash its
    JobOrder signs to match.

    Raises:
        pydantic.ValidationError: the changed spec does not validate.
    """
    if source == loaded.spec.data.source:
        return loaded
    fields = loaded.spec.model_dump(mode="json")
    spec = type(loaded.spec).model_validate({**fields, "data": {**fields["data"], "source": source}})
    return loaded.model_copy(update={"spec": spec, "spec_hash": spec_digest(spec)})


def _settle_own_jobs(opts: LocalOptions, coordinator_p: Participant, job_ids: list[str]) -> None:
    """After this market's head went down: each job it submitted that did not end is failed and
    what is left of its escrow refunded (``head.scheduler.settle_lost_jobs``), by this process,
    which holds the local coordinator's key and, the head being down, is the ledger's only writer."""
    from gpucoin.head.jobs import JobBoard, JobTable
    from gpucoin.head.scheduler import settle_lost_jobs

    ledger = open_ledger(opts, coordinator_p)
    try:
        coord = Coordinator(ledger, opts.policy, coordinator_p.account, ledger.domain)
        settle_lost_jobs(
            ledger,
            coord,
            JobTable(ledger.engine),
            JobBoard(opts.home / "jobs"),
            "the local run stopped before the job ended",
            include_queued=True,
            job_ids=set(job_ids),
        )
    finally:
        ledger.close()


def _summary(final, loaded: LoadedSpec, opts: LocalOptions, before: dict[str, int], timings: dict) -> dict:
    """The summary ``train_local`` returns, from the job's final view and the ledger."""
    from gpucoin.exceptions import TrainingError
    from gpucoin.head.records import JobState

    s = final.summary
    if s is None or (final.state == JobState.FAILED and s.steps == 0 and s.receipts.signed == 0):
        raise TrainingError(f"job {final.job_id} {final.state.value}: {final.reason or 'no reason given'}")
    ev = s.evaluation
    summary = {
        "job_id": final.job_id,
        "state": final.state.value,
        "val_loss": None if ev is None else ev.val_loss,
        "uniform_loss": None if ev is None else ev.uniform_loss,
        "steps": s.steps,
        "workers": loaded.spec.workers,
        "stopped": s.stopped if s.stopped is not None or final.state == JobState.SUCCEEDED else final.reason,
        "sample": "(not evaluated)" if ev is None else ev.sample,
        "receipts": s.receipts.model_dump(),
        "intervals": [
            {
                "steps": [int(x) for x in k.split("-")],
                "outcome": o,
                "wall_ms": s.interval_wall_ms.get(k, 0),
                "check_probability": s.check_probabilities.get(k),
                **({"ranks": s.failed_ranks[k]} if k in s.failed_ranks else {}),
            }
            for k, o in s.intervals.items()
        ],
        "group_tests": [t.model_dump() for t in s.group_tests],
        "rewinds": [
            {
                "kind": rw.kind,
                "to_step": rw.to_step,
                "reason": rw.reason,
                "intervals": [
                    {
                        "steps": [int(x) for x in k.split("-")],
                        "outcome": o,
                        **({"ranks": rw.failed_ranks[k]} if k in rw.failed_ranks else {}),
                    }
                    for k, o in rw.intervals.items()
                ],
                "replaced": [rp.model_dump() for rp in rw.replaced],
            }
            for rw in s.rewinds
        ],
        "nodes": {a: r.model_dump() for a, r in s.nodes.items()},
        "verifiers_slashed": dict(s.verifiers_slashed),
        "unsettled_intervals": [k for k, o in s.intervals.items() if o in ("pending", "held")],
        "max_replay_distance": s.max_replay_distance,
        "price_ugpc_per_worker_hour": final.price_ugpc_per_worker_hour,
        "ledger": {
            "escrowed": s.escrowed_ugpc,
            "paid": s.paid_ugpc,
            "burned": s.burned_ugpc,
            "treasury": s.treasury_ugpc,
            "minted": s.minted_ugpc,
            "slashed": s.slashed_ugpc,
            "refunded": s.refunded_ugpc,
        },
        "timings_s": timings,
    }
    with Ledger(f"sqlite:///{opts.home / 'ledger.db'}") as ledger:
        after = ledger.balances()
        totals = ledger.totals()
        problems = ledger.audit()
    summary["accounts"] = {
        a: {"before": before.get(a, 0), "after": after.get(a, 0), "change": after.get(a, 0) - before.get(a, 0)}
        for a in sorted(set(before) | set(after))
        if after.get(a, 0) != before.get(a, 0)
    }
    summary["ledger"].update(
        {"supply": totals["supply"], "total_minted": totals["minted"], "total_burned": totals["burned"]}
    )
    summary["audit"] = "ok" if not problems else problems
    return summary


def _host_gpu_count() -> int:
    """CUDA GPUs on this host (0 without CUDA); each local volunteer node gets one while they last."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for us, not a failed job
        return 0
