"""EIP-712 sign and verify rates: gpucoin.wallet.messages against plain eth-account, same messages.

Run from the repository root::

    .venv/bin/python -m benchmarks.signatures.run                  # 1000 messages, best of 5, ~10 s
    .venv/bin/python benchmarks/signatures/run.py --messages 200 --repeat 3
    .venv/bin/python -m benchmarks.signatures.run --json out/bench-signatures.json --profile

One run builds N messages (``--messages``, default 1000) of every gpucoin primary type in turn
(JobOrder, NodeRegistration, WorkReceipt, VerificationReport, Settlement, PolicyChange, Faucet; each
signed by the key its signer field names, Faucet by a faucet key), their full typed data and their
signatures, before any timing, and checks that gpucoin and eth-account produce the same digest and
the same signature for each. Then, on that same set, it times:

- signing: eth-account ``Account.sign_message(encode_typed_data(full_message=typed), key)`` (the
  signing baseline), eth-account ``Account.sign_typed_data(key, full_message=typed)``, and gpucoin
  ``sign(account, primary_type, domain, message)`` (which also validates and builds the typed data);
- verification: eth-account ``Account.recover_message(encode_typed_data(full_message=typed),
  signature=...)`` (the verification baseline), gpucoin ``verify(signed)`` (the full check: canonical
  message and domain, digest recomputed and compared, low s, signer and signer field compared),
  gpucoin ``recover_typed(typed, signature)`` (digest + signer from the typed data) and, for
  information, gpucoin ``verify`` with its EIP-55 checksum cache bypassed (every address as if new)
  and eth-account ``Account._recover_hash(digest, signature=...)`` from the digest alone.

Every case is timed ``--repeat`` times, the cases interleaved round-robin so load that comes and
goes hits all of them, and the fastest sample is kept. Rates are messages per second; each ratio is
a rate over the eth-account baseline of the same operation. Exit status: 0 if every gpucoin
verification row reaches ``--min-ratio`` (1.0: "at least as fast as plain eth-account with
coincurve"), 1 if not, 2 on an error (no coincurve backend, a digest or signature that differs
between gpucoin and eth-account, a wrong result during timing). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # `python benchmarks/signatures/run.py` from anywhere
    sys.path.insert(0, str(_REPO))

from eth_account import Account  # noqa: E402
from eth_account.messages import _hash_eip191_message, encode_typed_data  # noqa: E402
from eth_utils import keccak, to_checksum_address  # noqa: E402

import gpucoin.wallet.messages as gpucoin_messages  # noqa: E402
from benchmarks.common import clock, ecc_environment, print_rows  # noqa: E402
from gpucoin.wallet.messages import (  # noqa: E402
    MESSAGE_TYPES,
    SIGNER_FIELD,
    VERDICTS,
    Domain,
    SignedMessage,
    recover_typed,
    sign,
    verify,
)

SIGN_BASELINE = "sign: eth-account sign_message(encode_typed_data(full_message=typed), key)"
VERIFY_BASELINE = "verify: eth-account recover_message(encode_typed_data(full_message=typed), sig)"
GPUCOIN_VERIFY = "verify: gpucoin verify(signed)"
GPUCOIN_RECOVER = "verify: gpucoin recover_typed(typed, sig)"

FAUCET = Account.from_key(keccak(text="bench-signatures-faucet"))
DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "5e" * 20)


# -- environment ---------------------------------------------------------------------------


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One message, signed (untimed), with everything each side needs to sign or verify it again."""

    account: Any  # eth-account LocalAccount
    primary_type: str
    message: dict  # canonical fields (as signed)
    typed: dict  # full EIP-712 typed data, built once: eth-account's input
    signed: SignedMessage
    signature: bytes  # 65 bytes r || s || v
    digest: bytes


def _value(rng: random.Random, primary_type: str, name: str, typ: str, i: int) -> Any:
    """A plausible value of one field of message ``i`` (not the signer field)."""
    if typ == "address":
        return "0x" + rng.randbytes(20).hex()
    if typ == "bytes32":
        return "0x" + rng.randbytes(32).hex()
    if typ == "string":
        if primary_type == "VerificationReport" and name == "verdict":
            return rng.choice(VERDICTS)
        if name == "resources":
            return json.dumps(
                {"CPU": rng.randint(1, 64), "GPU": rng.randint(0, 8), "memory": rng.randint(1, 512) << 30}
            )
        if name == "nodeId":
            return rng.randbytes(28).hex()
        return f"{name}-{rng.randint(0, 99):02d}-shakespeare-char"
    if typ == "bool":
        return rng.random() < 0.5
    if typ == "Allocation[]":  # a Genesis: a few allocations
        return [
            {"recipient": "0x" + rng.randbytes(20).hex(), "amount": rng.randint(1, 10**12)}
            for _ in range(rng.randint(0, 4))
        ]
    bits = int(typ.removeprefix("uint"))
    if name == "nonce":
        return i
    return rng.randint(0, min(2**bits - 1, 10**12))


def build_items(n: int, accounts: Sequence[Any], rng: random.Random, start: int = 0) -> list[Item]:
    """``n`` messages, the primary types in turn, signed with gpucoin's ``sign`` (untimed)."""
    types = sorted(MESSAGE_TYPES)
    items = []
    for i in range(start, start + n):
        primary_type = types[i % len(types)]
        field_name = SIGNER_FIELD[primary_type]
        account = FAUCET if field_name is None else accounts[i % len(accounts)]
        message = {
            f["name"]: account.address
            if f["name"] == field_name
            else _value(rng, primary_type, f["name"], f["type"], i)
            for f in MESSAGE_TYPES[primary_type]
        }
        signed = sign(account, primary_type, DOMAIN, message)
        items.append(
            Item(
                account,
                primary_type,
                signed.message,
                signed.typed_data(),
                signed,
                bytes.fromhex(signed.signature[2:]),
                bytes.fromhex(signed.digest[2:]),
            )
        )
    return items


def check_agreement(items: Sequence[Item]) -> None:
    """gpucoin and eth-account compute the same digest and signature and recover the same signer (untimed).

    Raises:
        AssertionError: naming the first message where they differ.
    """
    for it in items:
        signable = encode_typed_data(full_message=it.typed)
        digest = bytes(_hash_eip191_message(signable))
        if digest != it.digest:
            raise AssertionError(
                f"{it.primary_type} nonce {it.message.get('nonce')}: eth-account digest 0x{digest.hex()} "
                f"!= gpucoin {it.signed.digest}"
            )
        theirs = bytes(Account.sign_message(signable, it.account.key).signature)
        if theirs != it.signature:
            raise AssertionError(
                f"{it.primary_type}: eth-account signature 0x{theirs.hex()} != gpucoin {it.signed.signature}"
            )
        if bytes(Account.sign_typed_data(it.account.key, full_message=it.typed).signature) != it.signature:
            raise AssertionError(f"{it.primary_type}: eth-account sign_typed_data disagrees with sign_message")
        if Account.recover_message(signable, signature=it.signature) != it.account.address:
            raise AssertionError(f"{it.primary_type}: eth-account recovers another signer")
        if verify(it.signed) != it.account.address:
            raise AssertionError(f"{it.primary_type}: gpucoin verify returns another signer")


# -- the timed operations ------------------------------------------------------------------
# Each returns one result per message, collected in a list and checked after the clock stops.


def sign_eth_account_message(items: Sequence[Item]) -> list[bytes]:
    return [
        bytes(Account.sign_message(encode_typed_data(full_message=it.typed), it.account.key).signature) for it in items
    ]


def sign_eth_account_typed(items: Sequence[Item]) -> list[bytes]:
    return [bytes(Account.sign_typed_data(it.account.key, full_message=it.typed).signature) for it in items]


def sign_gpucoin(items: Sequence[Item]) -> list[bytes]:
    return [bytes.fromhex(sign(it.account, it.primary_type, DOMAIN, it.message).signature[2:]) for it in items]


def recover_eth_account(items: Sequence[Item]) -> list[str]:
    return [Account.recover_message(encode_typed_data(full_message=it.typed), signature=it.signature) for it in items]


def recover_eth_account_hash(items: Sequence[Item]) -> list[str]:
    return [Account._recover_hash(it.digest, signature=it.signature) for it in items]


def verify_gpucoin(items: Sequence[Item]) -> list[str]:
    return [verify(it.signed) for it in items]


def recover_gpucoin(items: Sequence[Item]) -> list[str]:
    return [recover_typed(it.typed, it.signature)[1] for it in items]


@contextmanager
def checksum_cache_bypassed() -> Iterator[None]:
    """gpucoin.wallet.messages with ``checksum_address`` = the uncached ``eth_utils.to_checksum_address``.

    gpucoin caches EIP-55 checksums (``functools.lru_cache``, 4096 entries); here every signer and
    address repeats (a few keys, the same messages each sample), so the cache always hits. This
    shows the cost when no address has been seen before.
    """
    cached = gpucoin_messages.checksum_address
    gpucoin_messages.checksum_address = to_checksum_address
    try:
        yield
    finally:
        gpucoin_messages.checksum_address = cached


def verify_gpucoin_uncached(items: Sequence[Item]) -> list[str]:
    with checksum_cache_bypassed():
        return [verify(it.signed) for it in items]


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "sign" or "verify"
    kind: str  # "baseline", "gpucoin" or "info"
    fn: Callable[[Sequence[Item]], list]
    expected: Callable[[Item], Any]


CASES: list[Case] = [
    Case(SIGN_BASELINE, "sign", "baseline", sign_eth_account_message, lambda it: it.signature),
    Case(
        "sign: eth-account sign_typed_data(key, full_message=typed)",
        "sign",
        "info",
        sign_eth_account_typed,
        lambda it: it.signature,
    ),
    Case(
        "sign: gpucoin sign(account, type, domain, message)", "sign", "gpucoin", sign_gpucoin, lambda it: it.signature
    ),
    Case(VERIFY_BASELINE, "verify", "baseline", recover_eth_account, lambda it: it.account.address),
    Case(GPUCOIN_VERIFY, "verify", "gpucoin", verify_gpucoin, lambda it: it.account.address),
    Case(GPUCOIN_RECOVER, "verify", "gpucoin", recover_gpucoin, lambda it: it.account.address),
    Case(
        "info: gpucoin verify(signed), EIP-55 checksum cache bypassed",
        "verify",
        "info",
        verify_gpucoin_uncached,
        lambda it: it.account.address,
    ),
    Case(
        "info: eth-account _recover_hash(digest, sig) only",
        "verify",
        "info",
        recover_eth_account_hash,
        lambda it: it.account.address,
    ),
]


@dataclass
class Result:
    """One measured case: its fastest sample."""

    case: str
    op: str
    kind: str
    messages: int
    seconds: float
    cpu_seconds: float
    samples: list[float] = field(default_factory=list)  # seconds of every repeat
    ratio: float | None = None  # rate over the eth-account baseline of the same op

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "messages_per_s": self.rate, "us_per_message": 1e6 * self.seconds / self.messages}


def _check(case: Case, items: Sequence[Item], got: list) -> None:
    if len(got) != len(items):
        raise AssertionError(f"{case.name}: {len(got)} results for {len(items)} messages")
    for it, g in zip(items, got, strict=True):
        if g != case.expected(it):
            raise AssertionError(
                f"{case.name}: {it.primary_type} nonce {it.message.get('nonce')} gave {g!r}, "
                f"expected {case.expected(it)!r}"
            )


def measure(cases: Sequence[Case], items: Sequence[Item], warmup: Sequence[Item], repeat: int) -> list[Result]:
    """Time every case ``repeat`` times, round-robin, each sample after a warm-up pass; keep the fastest."""
    samples: dict[str, list[tuple[float, float]]] = {c.name: [] for c in cases}
    for _ in range(repeat):
        for case in cases:
            _check(case, warmup, case.fn(warmup))
            gc.collect()
            wall, cpu, got = clock(lambda case=case: case.fn(items))
            _check(case, items, got)
            samples[case.name].append((wall, cpu))
    results = []
    for case in cases:
        wall, cpu = min(samples[case.name])
        results.append(Result(case.name, case.op, case.kind, len(items), wall, cpu, [s[0] for s in samples[case.name]]))
    base = {r.op: r.rate for r in results if r.kind == "baseline"}
    for r in results:
        r.ratio = r.rate / base[r.op]
    return results


def profile_report(fn: Callable[[], Any], top: int = 15) -> str:
    """Top functions by self time of one call of ``fn`` under cProfile (read the shares, not the seconds)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    body = buf.getvalue()
    start = body.find("   ncalls")
    return body[start:].rstrip() if start >= 0 else body.rstrip()


# -- output --------------------------------------------------------------------------------


def print_table(results: Sequence[Result], out: Any = sys.stdout) -> None:
    headers = ["case", "messages", "seconds", "CPU s", "µs/msg", "msgs/s", "x eth-account"]
    rows = [
        [
            r.case,
            str(r.messages),
            f"{r.seconds:.3f}",
            f"{r.cpu_seconds:.3f}",
            f"{1e6 * r.seconds / r.messages:.0f}",
            f"{r.rate:,.0f}",
            f"{r.ratio:.2f}" if r.ratio is not None else "",
        ]
        for r in results
    ]
    print_rows(headers, rows, groups=[r.op for r in results], out=out)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.signatures.run",
        description="EIP-712 sign and verify rates (messages/s) of gpucoin.wallet.messages and of plain eth-account "
        "on the same messages of every gpucoin type, with coincurve as the ECC backend.",
    )
    p.add_argument(
        "--messages",
        type=int,
        default=1000,
        metavar="N",
        help="messages signed and verified in each timed sample (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=50,
        metavar="W",
        help="other messages run through each case, untimed, before each sample (default: %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=5,
        metavar="R",
        help="samples per case, cases interleaved round-robin; the fastest is kept (default: %(default)s)",
    )
    p.add_argument(
        "--keys",
        type=int,
        default=4,
        metavar="K",
        help="signing keys the messages rotate through (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=712, help="seed of the message contents (default: %(default)s)")
    p.add_argument(
        "--min-ratio",
        type=float,
        default=1.0,
        help="each gpucoin verification row must reach this multiple of eth-account's "
        "recover_message rate (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of one gpucoin verify pass (done anyway when below --min-ratio)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.messages < 1 or args.keys < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("--messages, --keys and --repeat must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        env = ecc_environment()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env["loadavg_at_start"] = list(os.getloadavg())
    print(
        f"eth-account {env['eth_account']}, eth-keys {env['eth_keys']} with backend {env['eth_keys_backend']} "
        f"(coincurve {env['coincurve']}); gpucoin recovers with {env['gpucoin_recovers_with']}; "
        f"python {env['python']}, {env['cpus']} CPUs"
    )

    rng = random.Random(args.seed)
    accounts = [Account.from_key(keccak(text=f"bench-signatures-{i}")) for i in range(args.keys)]
    t0 = time.perf_counter()
    items = build_items(args.messages, accounts, rng)
    warmup = build_items(args.warmup, accounts, rng, start=args.messages)
    try:
        check_agreement(items + warmup)
    except AssertionError as exc:
        print(f"error: gpucoin and eth-account disagree: {exc}", file=sys.stderr)
        return 2
    prep_s = time.perf_counter() - t0
    mix = Counter(it.primary_type for it in items)
    print(
        f"built, signed and cross-checked {len(items)} messages (+{len(warmup)} for warm-up) in {prep_s:.1f} s, "
        f"untimed: " + ", ".join(f"{n} {t}" for t, n in sorted(mix.items()))
    )
    print(f"timing {len(CASES)} cases x {args.repeat} samples, round-robin, best kept ...", flush=True)

    try:
        results = measure(CASES, items, warmup, args.repeat)
    except AssertionError as exc:
        print(f"error: wrong result while timing: {exc}", file=sys.stderr)
        return 2

    print()
    print_table(results)
    by_name = {r.case: r for r in results}
    sign_base, verify_base = by_name[SIGN_BASELINE], by_name[VERIFY_BASELINE]
    print()
    print("msgs/s: messages signed (sign rows) or whose signer was recovered / verified (verify rows) per second,")
    print(
        f"best of {args.repeat}. 'x eth-account' = that rate over eth-account's rate for the same operation: "
        f"sign_message {sign_base.rate:,.0f}/s,"
    )
    print(
        f"recover_message {verify_base.rate:,.0f}/s. eth-account rows start from the full typed data (built untimed);"
    )
    print(
        "gpucoin sign also validates and builds it; gpucoin verify rebuilds and re-validates it from the SignedMessage,"
    )
    print("compares digest, signer and signer field, and refuses high s. CPU s is this process only.")

    gated = [r for r in results if r.op == "verify" and r.kind == "gpucoin"]
    verdicts = {r.case: {"ratio": r.ratio, "min_ratio": args.min_ratio, "ok": r.ratio >= args.min_ratio} for r in gated}
    profile = None
    if args.profile or not all(v["ok"] for v in verdicts.values()):
        profile = profile_report(lambda: verify_gpucoin(items))
        print(f"\n== profile: gpucoin verify of {len(items)} messages, top functions by self time ==")
        print(profile)
    print()
    for name, v in verdicts.items():
        status = "PASS" if v["ok"] else "FAIL"
        print(f"{status}: {name} runs at {v['ratio']:.2f}x eth-account recover_message (needs >= {args.min_ratio})")
    total_s = time.perf_counter() - started
    env["loadavg_at_end"] = list(os.getloadavg())
    print(
        f"total {total_s:.1f} s; load average {env['loadavg_at_start'][0]:.2f} at start, "
        f"{env['loadavg_at_end'][0]:.2f} at end ({env['cpus']} CPUs: above ~0.5 the numbers are noisy)"
    )

    if args.json is not None:
        doc = {
            "benchmark": "EIP-712 sign and verify: gpucoin.wallet.messages vs plain eth-account",
            "config": {
                "messages": args.messages,
                "warmup": args.warmup,
                "repeat": args.repeat,
                "keys": args.keys,
                "seed": args.seed,
                "min_ratio": args.min_ratio,
                "type_mix": dict(sorted(mix.items())),
                "domain": DOMAIN.as_dict(),
            },
            "environment": env,
            "preparation_seconds": prep_s,
            "baselines_messages_per_s": {"sign": sign_base.rate, "verify": verify_base.rate},
            "results": [r.as_json() for r in results],
            "verdicts": verdicts,
            "ok": all(v["ok"] for v in verdicts.values()),
            "profile": profile,
            "total_seconds": total_s,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")

    failed = [name for name, v in verdicts.items() if not v["ok"]]
    if failed:
        print(f"below {args.min_ratio}x eth-account verification: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
