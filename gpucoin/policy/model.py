"""The incentive policy: a closed, validated schema loaded from TOML (``gpucoin/policies/*.toml``).

A policy fixes every number the market, tokenomics, verification and slashing use, so that
every part of gpucoin computes the same thing (SPEC.md, Money). Units are in the field names:
``_ugpc`` is µGPC (int), ``_bps`` basis points (int, 10_000 = 100 %), ``_s`` seconds (int).
Unknown keys, floats where an int is due and shares that do not add up are errors.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from eth_utils import keccak
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpucoin.exceptions import PolicyError
from gpucoin.money import MAX_AMOUNT_UGPC

BPS = 10_000
"""Basis points in one whole (100 %)."""

Bps = Annotated[int, Field(ge=0, le=BPS)]
Ugpc = Annotated[int, Field(ge=0, le=MAX_AMOUNT_UGPC)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class MarketPolicy(BaseModel):
    """How an auction round clears (SPEC.md, Scheduling)."""

    model_config = _STRICT

    clearing: Literal["uniform", "pay_as_bid"] = Field(
        description='"uniform": a job pays the highest ask among its chosen nodes; "pay_as_bid": it pays its bid. '
        "Both in µGPC per worker-hour."
    )
    min_bond_ugpc: Ugpc = Field(description="µGPC a node must have bonded to be admissible for any job.")
    allow_preemption: bool = Field(description="Whether a higher bid may preempt a running lower-bid job.")


class TokenomicsPolicy(BaseModel):
    """Payment split, emission schedule and reward shares (SPEC.md, Money)."""

    model_config = _STRICT

    mode: Literal["burn_and_mint", "direct"] = Field(
        description='"burn_and_mint": the payment is burned and workers are paid from emission; '
        '"direct": workers are paid the payment from escrow.'
    )
    burn_share_bps: Bps = Field(description="bps of a settled payment burned (paid to workers in direct mode).")
    treasury_share_bps: Bps = Field(description="bps of a settled payment sent to the treasury.")
    worker_share_bps: Bps = Field(description="bps of an interval's emission share minted to its workers.")
    verifier_share_bps: Bps = Field(description="bps of an interval's emission share minted to its verifier.")
    hard_cap_ugpc: Annotated[int, Field(gt=0, le=MAX_AMOUNT_UGPC)] = Field(
        description="µGPC the supply (minted - burned) may never exceed."
    )
    epoch_length_s: Annotated[int, Field(gt=0)] = Field(description="Seconds in one emission epoch.")
    initial_emission_ugpc: Ugpc = Field(description="µGPC minted in epoch 0 (before any halving).")
    emission_halving_epochs: Annotated[int, Field(gt=0)] = Field(
        description="Epochs after which the per-epoch emission halves."
    )

    @model_validator(mode="after")
    def _shares_sum(self) -> TokenomicsPolicy:
        if self.burn_share_bps + self.treasury_share_bps != BPS:
            raise ValueError(
                f"burn_share_bps + treasury_share_bps = {self.burn_share_bps} + {self.treasury_share_bps}"
                f" = {self.burn_share_bps + self.treasury_share_bps}, must be {BPS}"
            )
        if self.worker_share_bps + self.verifier_share_bps != BPS:
            raise ValueError(
                f"worker_share_bps + verifier_share_bps = {self.worker_share_bps} + {self.verifier_share_bps}"
                f" = {self.worker_share_bps + self.verifier_share_bps}, must be {BPS}"
            )
        if self.initial_emission_ugpc > self.hard_cap_ugpc:
            raise ValueError(
                f"initial_emission_ugpc = {self.initial_emission_ugpc} exceeds hard_cap_ugpc = {self.hard_cap_ugpc}"
            )
        return self


class VerificationPolicy(BaseModel):
    """Spot-check sampling and the replay tolerance (SPEC.md, Verification of training work)."""

    model_config = _STRICT

    check_probability: Probability = Field(description="Probability an interval of an established node is replayed.")
    new_node_check_probability: Probability = Field(
        description="Probability an interval is replayed for a new or recently failed node (BOINC-style adaptive)."
    )
    new_node_intervals: Annotated[int, Field(ge=0)] = Field(
        description="Passed checks in a row (verifier reports that passed its receipts, over every job) after "
        "which a node counts as established (``verify.sampling.check_probability``)."
    )
    sketch_buckets: Annotated[int, Field(gt=0)] = Field(description="Numbers in one per-rank gradient sketch.")
    tolerance_rel_l2: Annotated[float, Field(gt=0.0)] = Field(
        description="Largest relative L2 distance between a committed and a replayed gradient sketch that passes."
    )
    challenge_window_s: Annotated[int, Field(ge=0)] = Field(
        description="Seconds an unchecked interval waits before it settles."
    )
    recheck_share_bps: Bps = Field(
        default=0,
        description=(
            "bps of the replayed intervals replayed again by a second verifier node (neither in the job nor the "
            "first verifier; skipped when the market has none free). A report the re-check shows false slashes its "
            "verifier as a fraud slashes a worker (``verify.recheck``); without it a verifier earns as much by "
            "signing 'pass' without replaying."
        ),
    )
    vetted_packages: tuple[Annotated[str, Field(pattern=r"^0x[0-9a-f]{64}$")], ...] = Field(
        default=(),
        strict=False,
        max_length=10_000,
        description=(
            "Job packages (``gpucoin.spec.package_hash``, as a JobOrder signs it) reviewed not to compute "
            "differently under replay. Only in their jobs can a replay's mismatch slash a rank; in any other "
            "job it voids the interval and the submitter is charged, the charge burned."
        ),
    )

    @model_validator(mode="after")
    def _new_nodes_checked_more(self) -> VerificationPolicy:
        if self.new_node_check_probability < self.check_probability:
            raise ValueError(
                f"new_node_check_probability = {self.new_node_check_probability} is below check_probability = "
                f"{self.check_probability}; new nodes must be checked at least as often"
            )
        return self


class MeteringPolicy(BaseModel):
    """How an interval's worker time is metered, so that stalling earns nothing (docs/security.md, Stalling)."""

    model_config = _STRICT

    interval_timeout_s: Annotated[int, Field(gt=0, le=86_400)] = Field(
        description="Seconds a rank has to deliver an interval's receipt after its previous one (after the launch, "
        "for the first) before it counts as a lost node: the job stops and that interval is not paid."
    )
    pace_slack_bps: Annotated[int, Field(ge=10_000, le=100_000)] = Field(
        description="An interval after the first is metered at most this many bps of the job's fastest pace per "
        "step so far (10,000: that pace exactly), so a rank slowing every rank down raises the bill by at most this."
    )


class SlashingPolicy(BaseModel):
    """What a proven fraud costs the cheater (SPEC.md, Money)."""

    model_config = _STRICT

    fraud_slash_fraction_bps: Bps = Field(description="bps of the cheater's bond taken by a slash.")
    whistleblower_share_bps: Bps = Field(description="bps of the slashed amount paid to the verifier; the rest burns.")
    ban_after_frauds: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=3,
        description="Proven frauds (slashes of a provider, as a worker or as a verifier whose report a re-check "
        "showed false, over every job) after which the head never places that provider's nodes again.",
    )


class BondingPolicy(BaseModel):
    """Stake lock-up."""

    model_config = _STRICT

    unbonding_epochs: Annotated[int, Field(ge=0)] = Field(
        description="Epochs unbonding stake stays slashable before it can be withdrawn."
    )


class Policy(BaseModel):
    """A whole incentive policy, as in ``gpucoin/policies/default.toml``."""

    model_config = _STRICT

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = Field(
        description="Short name of the policy."
    )
    version: Annotated[int, Field(ge=1)] = Field(description="Version of this named policy.")
    chain_id: Annotated[int, Field(ge=1)] = Field(description="EIP-712 domain chainId of every signed message.")
    market: MarketPolicy
    tokenomics: TokenomicsPolicy
    verification: VerificationPolicy
    metering: MeteringPolicy
    slashing: SlashingPolicy
    bonding: BondingPolicy


def _describe(err: dict[str, Any]) -> str:
    """One-line text for one pydantic error: ``field: problem``."""
    loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind == "int_type" and isinstance(err.get("input"), float):
        return f"{loc}: must be an integer (amounts are whole µGPC, never floats), got {err['input']!r}"
    if kind in ("value_error", "assertion_error"):
        return f"{loc}: {msg}"
    return f"{loc}: {msg}, got {err.get('input')!r}"


def parse_policy(data: dict[str, Any], source: str = "<policy>") -> Policy:
    """Validate a policy given as a dict (the parsed TOML).

    Raises:
        PolicyError: one line ``<source>: <field>: <problem>`` for the first problem found.
    """
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        line = f"{source}: {_describe(errs[0])}{more}"
        raise PolicyError(" ".join(line.split())) from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate the TOML policy at ``path``.

    Raises:
        PolicyError: one line naming the file, the field and the problem (an unreadable file,
            invalid TOML, an unknown or missing key, a bad value).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PolicyError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PolicyError(f"{p}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{p}: not valid TOML: {' '.join(str(e).split())}") from None
    return parse_policy(data, str(p))


SHIPPED_POLICIES_DIR = Path(__file__).resolve().parents[1] / "policies"
"""The policies gpucoin ships (package data, so an installed wheel has them): ``<name>.toml``."""


def shipped_policy_names() -> list[str]:
    """Names of the shipped policies (``default``, ``local``, ...), sorted."""
    return sorted(p.stem for p in SHIPPED_POLICIES_DIR.glob("*.toml"))


def resolve_policy(name_or_path: str | Path) -> Policy:
    """The shipped policy called ``name_or_path`` (e.g. ``local``), else the TOML file at that path.

    Raises:
        PolicyError: as ``load_policy``; for a bare name that is neither shipped nor a file, one
            line listing the shipped names.
    """
    text = str(name_or_path)
    if text in shipped_policy_names():
        return load_policy(SHIPPED_POLICIES_DIR / f"{text}.toml")
    p = Path(text)
    if not p.exists() and p.suffix != ".toml" and "/" not in text:
        raise PolicyError(
            f"no policy {text!r}: the shipped ones are {', '.join(shipped_policy_names())}; or give a .toml file"
        )
    return load_policy(p)


def canonical_json(policy: Policy) -> str:
    """The policy as JSON with sorted keys and no whitespace: the bytes ``policy_hash`` hashes."""
    return json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def policy_hash(policy: Policy) -> str:
    """``0x`` + keccak256 hex of ``canonical_json(policy)`` (UTF-8): the hash PolicyChange and Settlement sign."""
    return "0x" + keccak(text=canonical_json(policy)).hex()
