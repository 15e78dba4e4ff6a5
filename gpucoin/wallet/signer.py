"""A node's signing process: the only holder of its key, reachable through a local socket.

Job code runs inside the Ray workers of a volunteer's node, so no Ray process holds the node's
key or its keystore password. A signer is started with the node, unlocks the keystore from a
password read on its stdin (never an environment variable or argument), listens on a unix socket
in a 0700 directory, and signs only what its scope allows (``SigningScope``):

- ``WorkReceipt``: only for a (job, rank) the market's coordinator assigned to this provider
  (a coordinator-signed ``Assignment`` in the signer's domain, shown with each request), with
  ``worker`` = this provider, starting at the Assignment's ``fromStep`` and then exactly where the
  previous receipt it signed under that Assignment ended, never the same steps twice under one
  Assignment. (After a coordinator's Rewind the ledger admits a new Assignment of the rank from
  the Rewind's ``toStep``, and the steps from there are signed again, under it.)
- ``VerificationReport``: only in the verifier role, and only on verdicts the signer reaches
  itself: the replaying process (which ran the submitter's code) hands over its evidence
  (``verify.judgment.Evidence``) with the interval's signed receipts, their coordinator-signed
  Assignments and the committed sketches; the signer checks that each receipt is its assigned
  provider's and that the sketches hash to its signed ``sketchRoot``, then judges
  (``judgment.decide``, with the policy tolerance it was started with) and signs one report per
  finding; each receipt is judged once.

Nothing else (no NodeRegistration, transfer, Unbond or Withdraw) is ever signed here.

Who may connect: the socket is its owner's only; given a node user (gpucoin runs as root, the
nodes as that user), the socket is also its group's, and each connection's peer uid
(``SO_PEERCRED``) must be the signer's own or the node user's.

Protocol: one JSON object per line each way; a request is at most ``MAX_REQUEST_BYTES``.
``{"op": "address"}`` -> ``{"address": ...}``; ``{"op": "sign", "type": T, "message": {...},
"assignment": "<signed JSON>"}`` -> ``{"signed": "<signed JSON>"}``; ``{"op": "judge",
"step_start": n, "committed": <array>, "evidence": {...}, "receipts": [...], "start_receipts":
[...], "assignments": [...], "vetted": bool}`` -> ``{"reports": [...], "findings": [...]}``; any
refusal -> ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpucoin.cluster.node_user import NodeUser
from gpucoin.coordinator.receipts import check_signed
from gpucoin.exceptions import SignatureError, WalletError
from gpucoin.verify.commitment import sketch_root
from gpucoin.verify.judgment import Evidence, Finding, decide, decode_array, encode_array
from gpucoin.wallet.messages import Domain, SignedMessage, distance_e9, sign, validate_message, verify
from gpucoin.wallet.nonces import NonceSource

SOCKET_ENV = "GPUCOIN_SIGNER_SOCKET"
"""Environment variable a node's processes find their signer's socket path in (not a secret)."""

MAX_REQUEST_BYTES = 32 * 2**20
"""Largest request line accepted (a receipt request is under 2 KiB; a judge request carries
three (W, K, B) float64 arrays in base64, 3.5 MiB each for 8 ranks x 10 steps x 4096 buckets)."""

MAX_CONNECTIONS = 8
"""Clients served at once; more are refused (a node's ranks and its verifier use one or two)."""

REQUEST_TIMEOUT_S = 30.0
"""A client that sends nothing for this long is disconnected."""

START_TIMEOUT_S = 60.0
"""Bound on unlocking the keystore and binding the socket at start."""

ROLES = ("volunteer", "verifier")


class SigningRefused(WalletError):
    """The signer will not sign this request (out of its scope)."""


@dataclass
class SigningScope:
    """What one node's signer may sign; pure logic, no I/O.

    Attributes:
        address: the node's own checksum address.
        coordinator: checksum address of the market coordinator whose Assignments it trusts.
        domain: the market's EIP-712 domain; everything it signs or accepts is in it.
        role: ``volunteer`` (WorkReceipts) or ``verifier`` (VerificationReports).
        next_start: per Assignment digest, the step the next WorkReceipt under it must start at.
    """

    address: str
    coordinator: str
    domain: Domain
    role: str = "volunteer"
    tolerance: float | None = None
    next_start: dict[str, int] = field(default_factory=dict)
    judged: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.role == "verifier" and not (isinstance(self.tolerance, float) and self.tolerance > 0):
            raise ValueError(f"a verifier's signer needs the policy's tolerance > 0, got {self.tolerance!r}")

    def judge(self, req: dict) -> list[Finding]:
        """The findings of a judge request (module docstring), once its inputs check out; records
        its receipts as judged.

        Raises:
            SigningRefused: not a verifier; a receipt not signed by its rank's assigned provider,
                of another job, interval or rank, or judged before; committed sketches that do not
                hash to the signed roots. ValueError: malformed evidence or arrays.
        """
        if self.role != "verifier":
            raise SigningRefused("this node's signer does not judge replays")
        step_start = req.get("step_start")
        receipts, starts, assignments = req.get("receipts"), req.get("start_receipts"), req.get("assignments")
        if not isinstance(step_start, int) or not all(isinstance(x, list) for x in (receipts, starts, assignments)):
            raise SigningRefused("a judge request needs step_start and lists of receipts, start_receipts, assignments")
        W = len(receipts)
        if W == 0 or len(assignments) != W or len(starts) not in (0, W):
            raise SigningRefused(f"{W} receipts, {len(assignments)} assignments, {len(starts)} start receipts")
        committed = decode_array(req.get("committed"))
        if committed is None or committed.ndim != 3 or committed.shape[0] != W:
            raise SigningRefused(f"committed sketches must be ({W}, K, B), got {getattr(committed, 'shape', None)}")
        job = None
        signed, start_signed = [], []
        for r in range(W):
            a = self._assignment(assignments[r])
            if r == 0:
                job = a["jobId"]
            if (a["jobId"], a["rank"]) != (job, r):
                raise SigningRefused(
                    f"assignment {r} is of job {a['jobId']!r} rank {a['rank']}, expected {job!r} rank {r}"
                )
            rec = self._receipt(receipts[r], job, r, a["provider"])
            m = rec.message
            if (m["stepStart"], m["stepEnd"]) != (step_start, step_start + committed.shape[1]):
                raise SigningRefused(
                    f"rank {r}'s receipt covers steps {m['stepStart']}-{m['stepEnd']}, not this interval"
                )
            if sketch_root(step_start, committed[r]) != m["sketchRoot"]:
                raise SigningRefused(f"rank {r}'s committed sketches do not hash to its signed sketchRoot")
            if rec.digest in self.judged:
                raise SigningRefused(f"rank {r}'s receipt {rec.digest} was judged before")
            signed.append(rec)
            if starts:
                prev = self._receipt(starts[r], job, r, None)
                if prev.message["stepEnd"] != step_start or m["previousReceipt"] != prev.digest:
                    raise SigningRefused(f"rank {r}'s start receipt is not the one its receipt chains to")
                start_signed.append(prev)
        evidence = Evidence.from_dict(req.get("evidence") or {})
        findings = decide(
            step_start,
            committed,
            evidence,
            self.tolerance,
            tuple(x.digest for x in signed),
            tuple(x.digest for x in start_signed),
            vetted=req.get("vetted") is True,
        )
        self.judged.update(x.digest for x in signed)
        return findings

    def _assignment(self, assignment_json: object) -> dict:
        try:
            assignment = SignedMessage.from_json(assignment_json)
            verify(assignment, expected_signer=self.coordinator, domain=self.domain)
        except (SignatureError, TypeError, ValueError) as e:
            raise SigningRefused(f"the Assignment does not verify: {e}") from None
        if assignment.primary_type != "Assignment":
            raise SigningRefused(f"expected an Assignment, got a {assignment.primary_type}")
        return assignment.message

    def _receipt(self, receipt_json: object, job: str, rank: int, worker: str | None) -> SignedMessage:
        """A WorkReceipt of (job, rank) signed by ``worker`` (None: by the worker it names)."""
        try:
            receipt = SignedMessage.from_json(receipt_json)
            check_signed(
                receipt, job_id=job, rank=rank, worker=worker or receipt.message.get("worker", ""), domain=self.domain
            )
        except (SignatureError, TypeError, ValueError) as e:
            raise SigningRefused(f"rank {rank}'s receipt: {e}") from None
        return receipt

    def admit(self, primary_type: str, message: dict, assignment_json: str | None) -> None:
        """Raise ``SigningRefused`` unless ``message`` of ``primary_type`` is in scope; on a
        WorkReceipt that is, record that its (job, rank) continues at its ``stepEnd``."""
        if primary_type == "VerificationReport":
            raise SigningRefused("a VerificationReport is signed only on the signer's own verdict (op 'judge')")
        if primary_type != "WorkReceipt":
            raise SigningRefused(f"this signer never signs a {primary_type}")
        if self.role != "volunteer":
            raise SigningRefused("a verifier's signer does not sign WorkReceipts")
        if not isinstance(assignment_json, str):
            raise SigningRefused("a WorkReceipt request must carry its coordinator-signed Assignment")
        try:
            assignment = SignedMessage.from_json(assignment_json)
            verify(assignment, expected_signer=self.coordinator, domain=self.domain)
        except SignatureError as e:
            raise SigningRefused(f"the Assignment does not verify: {e}") from None
        a = assignment.message
        if assignment.primary_type != "Assignment" or a["provider"] != self.address:
            raise SigningRefused("the Assignment does not assign this provider")
        if message.get("worker") != self.address:
            raise SigningRefused("a WorkReceipt must name this node's provider as its worker")
        if (message.get("jobId"), message.get("rank")) != (a["jobId"], a["rank"]):
            raise SigningRefused(
                f"this node is assigned job {a['jobId']!r} rank {a['rank']}, not "
                f"job {message.get('jobId')!r} rank {message.get('rank')}"
            )
        key = assignment.digest
        start, end = message.get("stepStart"), message.get("stepEnd")
        expected = self.next_start.get(key, a["fromStep"])
        if not (isinstance(start, int) and isinstance(end, int)) or start != expected or end <= start:
            raise SigningRefused(
                f"steps {start}-{end}: the next receipt of job {a['jobId']!r} rank {a['rank']} under its "
                f"Assignment must start at step {expected}"
            )
        self.next_start[key] = end


class _Handler(socketserver.StreamRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def handle(self) -> None:
        server: SignerServer = self.server  # type: ignore[assignment]
        while True:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                self._reply({"error": f"request over {MAX_REQUEST_BYTES} bytes"})
                return
            self._reply(server.answer(line))

    def _reply(self, obj: dict) -> None:
        self.wfile.write(json.dumps(obj).encode() + b"\n")
        self.wfile.flush()


class SignerServer(socketserver.ThreadingUnixStreamServer):
    """The signing process's server: ``answer`` under one lock (a scope's state is sequential)."""

    daemon_threads = True

    def __init__(self, path: str, account, scope: SigningScope, peer_uids: frozenset[int] | None = None):
        self.peer_uids = peer_uids if peer_uids is not None else frozenset({os.getuid()})
        self.account = account
        self.scope = scope
        self.lock = threading.Lock()
        self.nonces = NonceSource()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(path, _Handler)

    def verify_request(self, request, client_address) -> bool:
        """Serve only processes of this user or the node user (the kernel's ``SO_PEERCRED``)."""
        creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid in self.peer_uids

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over MAX_CONNECTIONS: refused, not queued
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def answer(self, line: bytes) -> dict:
        """The reply to one request line (never raises)."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise SigningRefused("a request is a JSON object")
            if req.get("op") == "address":
                return {"address": self.account.address}
            if req.get("op") == "judge":
                return self._judge(req)
            if req.get("op") != "sign":
                raise SigningRefused(f"unknown op {req.get('op')!r}")
            primary, message = req.get("type"), req.get("message")
            if not isinstance(primary, str) or not isinstance(message, dict):
                raise SigningRefused("a sign request needs a type and a message object")
            # the scope judges the canonical message that will be signed; a malformed one uses no steps
            message = validate_message(primary, message)
            with self.lock:
                self.scope.admit(primary, message, req.get("assignment"))
                signed = sign(self.account, primary, self.scope.domain, message)
            return {"signed": signed.to_json()}
        except (ValueError, SignatureError, WalletError) as e:
            return {"error": str(e) or type(e).__name__}
        except Exception as e:  # noqa: BLE001 - a request must never take the signer down
            return {"error": f"{type(e).__name__}: {e}"}

    def _judge(self, req: dict) -> dict:
        with self.lock:
            findings = self.scope.judge(req)
            reports = [
                sign(
                    self.account,
                    "VerificationReport",
                    self.scope.domain,
                    {
                        "verifier": self.account.address,
                        "receiptDigest": f.receipt,
                        "verdict": f.verdict,
                        "distanceE9": distance_e9(f.distance),
                        "nonce": self.nonces.next(),
                    },
                ).to_json()
                for f in findings
            ]
        return {"reports": reports, "findings": [f.to_dict() for f in findings]}


class SignerClient:
    """A node process's connection to its signer (path from ``$GPUCOIN_SIGNER_SOCKET`` by default).

    Raises:
        WalletError: if the node has no signer or it cannot be reached; ``SigningRefused`` if the
            signer refuses a request.
    """

    def __init__(self, path: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S):
        path = path or os.environ.get(SOCKET_ENV)
        if not path:
            raise WalletError(f"this node was started without a signer ({SOCKET_ENV} unset); it cannot sign")
        self.path = path
        self.timeout_s = timeout_s
        self._address: str | None = None

    def _call(self, req: dict) -> dict:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout_s)
                s.connect(self.path)
                s.sendall(json.dumps(req).encode() + b"\n")
                reply = s.makefile("rb").readline(MAX_REQUEST_BYTES + 1)
        except OSError as e:
            raise WalletError(f"cannot reach this node's signer at {self.path}: {e}") from None
        try:
            out = json.loads(reply)
        except ValueError:
            raise WalletError("the signer's reply is not JSON") from None
        if "error" in out:
            raise SigningRefused(f"the signer refused: {out['error']}")
        return out

    @property
    def address(self) -> str:
        """The node's checksum address."""
        if self._address is None:
            self._address = self._call({"op": "address"})["address"]
        return self._address

    def judge(
        self,
        *,
        step_start: int,
        committed: np.ndarray,
        evidence: Evidence,
        receipts: tuple[str, ...],
        start_receipts: tuple[str, ...],
        assignments: tuple[str, ...],
        vetted: bool,
    ) -> tuple[list[str], list[Finding]]:
        """Have the verifier's signer judge an interval's evidence (``SigningScope.judge``).

        Args:
            committed: (W, K, B) float64 sketches the ranks committed to; receipts /
                start_receipts: signed WorkReceipt JSON, rank order; assignments: each rank's
                coordinator-signed Assignment JSON; vetted: the job's package is vetted.

        Returns:
            (signed VerificationReport JSON per finding, the findings).
        """
        out = self._call(
            {
                "op": "judge",
                "step_start": step_start,
                "committed": encode_array(committed),
                "evidence": evidence.to_dict(),
                "receipts": list(receipts),
                "start_receipts": list(start_receipts),
                "assignments": list(assignments),
                "vetted": vetted,
            }
        )
        return list(out["reports"]), [Finding.from_dict(f) for f in out["findings"]]

    def sign(self, primary_type: str, message: dict, assignment_json: str | None = None) -> SignedMessage:
        """Have the signer sign ``message`` (in its own domain); see ``SigningScope`` for what it will."""
        req = {"op": "sign", "type": primary_type, "message": message, "assignment": assignment_json}
        return SignedMessage.from_json(self._call(req)["signed"])


@dataclass
class SignerProcess:
    """A running signer: its process and socket path."""

    process: subprocess.Popen
    socket_path: Path

    def stop(self) -> None:
        """Terminate it (bounded wait, then kill)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def socket_dir_for(path: Path, node_user: NodeUser | None) -> Path:
    """Make ``path`` (an existing directory of ours) fit to hold signer sockets: ours alone, or
    searchable by ``node_user``'s group, whose processes alone a signer serves besides ours."""
    if node_user is not None:
        os.chown(path, -1, node_user.gid)
        os.chmod(path, 0o710)
    else:
        os.chmod(path, 0o700)
    return path


def start_signer(
    keystore: Path,
    password: str,
    socket_path: Path,
    coordinator: str,
    domain: Domain,
    role: str = "volunteer",
    tolerance: float | None = None,
    node_user: NodeUser | None = None,
    log_path: Path | None = None,
) -> SignerProcess:
    """Start a signing process for ``keystore`` listening on ``socket_path``; return once it serves.

    ``log_path``: where its errors go (appended), for a signer that outlives this process (a
    ``gpucoin join`` node's); None: a pipe this process reads if the signer fails to start.

    ``tolerance`` is the policy's ``tolerance_rel_l2``, which a verifier's signer judges by;
    ``node_user``, the user whose processes may connect besides this one (the socket's group is
    then its group, and the directory of ``socket_path`` must let that group search it).

    The password goes to the child on a pipe, never through its environment or arguments.

    Raises:
        WalletError: if the keystore does not unlock or the signer is not up within ``START_TIMEOUT_S``.
    """
    args = [
        sys.executable,
        "-m",
        "gpucoin.wallet.signer",
        str(keystore),
        str(socket_path),
        coordinator,
        json.dumps(domain.as_dict()),
        role,
        json.dumps(tolerance),
        json.dumps(None if node_user is None else [node_user.uid, node_user.gid]),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUCOIN_", "RAY_"))}
    err_to = subprocess.PIPE if log_path is None else open(log_path, "ab")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_to, env=env, start_new_session=True
        )
    finally:
        if log_path is not None:
            err_to.close()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(password.encode() + b"\n")
    proc.stdin.close()
    # "ready\n" once it listens, or EOF when it exits; never wait past START_TIMEOUT_S
    readable, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    ready = proc.stdout.readline() if readable else b""
    if ready.strip() != b"ready":
        proc.kill()
        if proc.stderr is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        else:
            err = Path(log_path).read_text(errors="replace").strip().splitlines() if log_path else []
        raise WalletError(f"the signer for {keystore} did not start: {err[-1] if err else 'no output'}")
    return SignerProcess(proc, Path(socket_path))


def main(argv: list[str]) -> int:
    """``python -m gpucoin.wallet.signer KEYSTORE SOCKET COORDINATOR DOMAIN_JSON ROLE TOLERANCE_JSON
    PEER_JSON`` (password on stdin; PEER_JSON: ``[uid, gid]`` of the node user, or null)."""
    from gpucoin.wallet.keystore import load_keystore

    keystore, path, coordinator, domain_json, role, tolerance_json, peer_json = argv
    password = sys.stdin.readline().rstrip("\n")
    try:
        account = load_keystore(keystore, password)
    except WalletError as e:
        print(str(e), file=sys.stderr)
        return 2
    scope = SigningScope(
        account.address, coordinator, Domain.from_dict(json.loads(domain_json)), role, json.loads(tolerance_json)
    )
    peer = json.loads(peer_json)
    old = os.umask(0o077)  # the socket is this user's only until it is handed to the node user's group
    try:
        uids = frozenset({os.getuid()} | ({peer[0]} if peer else set()))
        server = SignerServer(path, account, scope, uids)
        if peer:
            os.chown(path, -1, peer[1])
            os.chmod(path, 0o660)
    finally:
        os.umask(old)
    print("ready", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
