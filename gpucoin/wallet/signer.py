"""A node's signing process: the only holder of its key, reachable through a local socket.

Job code runs inside the Ray workers of a volunteer's node, so no Ray process holds the node's
key or its keystore password. A signer is started with the node, unlocks the keystore from a
password read on its stdin (never an environment variable or argument), listens on a unix socket
in a 0700 directory, and signs only what its scope allows (``SigningScope``):

- ``WorkReceipt``: only for a (job, rank) the market's coordinator assigned to this provider
  (a coordinator-signed ``Assignment`` in the signer's domain, shown with each request), with
  ``worker`` = this provider, starting at the Assignment's ``fromStep`` and then exactly where the
  previous receipt it signed for that (job, rank) ended, never the same steps twice.
- ``VerificationReport``: only if the signer was started in the verifier role.

Nothing else (no NodeRegistration, transfer, Unbond or Withdraw) is ever signed here.

Protocol: one JSON object per line each way; a request is at most ``MAX_REQUEST_BYTES``.
``{"op": "address"}`` -> ``{"address": ...}``; ``{"op": "sign", "type": T, "message": {...},
"assignment": "<signed JSON>"}`` -> ``{"signed": "<signed JSON>"}``; any refusal ->
``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import socketserver
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from gpucoin.exceptions import SignatureError, WalletError
from gpucoin.wallet.messages import Domain, SignedMessage, sign, validate_message, verify

SOCKET_ENV = "GPUCOIN_SIGNER_SOCKET"
"""Environment variable a node's processes find their signer's socket path in (not a secret)."""

MAX_REQUEST_BYTES = 64 * 1024
"""Largest request line accepted (a receipt request is under 2 KiB)."""

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
        next_start: per (job id, rank), the step its next WorkReceipt must start at.
    """

    address: str
    coordinator: str
    domain: Domain
    role: str = "volunteer"
    next_start: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def admit(self, primary_type: str, message: dict, assignment_json: str | None) -> None:
        """Raise ``SigningRefused`` unless ``message`` of ``primary_type`` is in scope; on a
        WorkReceipt that is, record that its (job, rank) continues at its ``stepEnd``."""
        if primary_type == "VerificationReport":
            if self.role != "verifier":
                raise SigningRefused("this node's signer does not sign VerificationReports")
            if message.get("verifier") != self.address:
                raise SigningRefused("a VerificationReport must name this node as its verifier")
            return
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
        key = (a["jobId"], a["rank"])
        start, end = message.get("stepStart"), message.get("stepEnd")
        expected = self.next_start.get(key, a["fromStep"])
        if not (isinstance(start, int) and isinstance(end, int)) or start != expected or end <= start:
            raise SigningRefused(f"steps {start}-{end}: the next receipt of {key} must start at step {expected}")
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

    def __init__(self, path: str, account, scope: SigningScope):
        self.account = account
        self.scope = scope
        self.lock = threading.Lock()
        super().__init__(path, _Handler)

    def answer(self, line: bytes) -> dict:
        """The reply to one request line (never raises)."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise SigningRefused("a request is a JSON object")
            if req.get("op") == "address":
                return {"address": self.account.address}
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


def start_signer(
    keystore: Path, password: str, socket_path: Path, coordinator: str, domain: Domain, role: str = "volunteer"
) -> SignerProcess:
    """Start a signing process for ``keystore`` listening on ``socket_path``; return once it serves.

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
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUCOIN_", "RAY_"))}
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(password.encode() + b"\n")
    proc.stdin.close()
    # "ready\n" once it listens, or EOF when it exits; never wait past START_TIMEOUT_S
    readable, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    ready = proc.stdout.readline() if readable else b""
    if ready.strip() != b"ready":
        proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
        raise WalletError(f"the signer for {keystore} did not start: {err[-1] if err else 'no output'}")
    return SignerProcess(proc, Path(socket_path))


def main(argv: list[str]) -> int:
    """``python -m gpucoin.wallet.signer KEYSTORE SOCKET COORDINATOR DOMAIN_JSON ROLE`` (password on stdin)."""
    from gpucoin.wallet.keystore import load_keystore

    keystore, path, coordinator, domain_json, role = argv
    password = sys.stdin.readline().rstrip("\n")
    try:
        account = load_keystore(keystore, password)
    except WalletError as e:
        print(str(e), file=sys.stderr)
        return 2
    scope = SigningScope(account.address, coordinator, Domain.from_dict(json.loads(domain_json)), role)
    old = os.umask(0o077)  # the socket is this user's only
    try:
        server = SignerServer(path, account, scope)
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
