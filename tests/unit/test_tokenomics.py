"""Token arithmetic and settlement plans: exact sums, caps, pro-rata rewards, conservation."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucoin.exceptions import AmountError, UnknownAccount
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, escrow_account, wallet_account
from gpucoin.ledger.epochs import epoch_at, epoch_end_s
from gpucoin.ledger.plans import (
    charge_amounts,
    plan_bond,
    plan_escrow,
    plan_faucet,
    plan_genesis,
    plan_interval,
    plan_mint,
    plan_refund,
    plan_slash,
    plan_unbond,
    plan_withdraw,
    slash_split,
    split_equally,
)
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.money import MAX_AMOUNT_UGPC
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, Policy, SlashingPolicy, TokenomicsPolicy, load_policy
from gpucoin.policy.tokenomics import (
    SettledInterval,
    distribute_emission,
    emission_ugpc,
    interval_payment_ugpc,
    slash_amounts,
    split_payment,
)

POLICY: Policy = load_policy(SHIPPED_POLICIES_DIR / "default.toml")
TOK = POLICY.tokenomics
DIRECT = TOK.model_copy(update={"mode": "direct"})
ADDR = [f"0x{i + 1:040x}" for i in range(12)]
DIGEST = "0x" + "ab" * 32

amounts = st.integers(min_value=0, max_value=MAX_AMOUNT_UGPC)
bps = st.integers(min_value=0, max_value=10_000)


@st.composite
def tokenomics(draw: st.DrawFn) -> TokenomicsPolicy:
    treasury = draw(bps)
    verifier = draw(bps)
    cap = draw(st.integers(min_value=1, max_value=MAX_AMOUNT_UGPC))
    return TokenomicsPolicy(
        mode=draw(st.sampled_from(["burn_and_mint", "direct"])),
        burn_share_bps=10_000 - treasury,
        treasury_share_bps=treasury,
        worker_share_bps=10_000 - verifier,
        verifier_share_bps=verifier,
        hard_cap_ugpc=cap,
        epoch_length_s=draw(st.integers(min_value=1, max_value=10**6)),
        initial_emission_ugpc=draw(st.integers(min_value=0, max_value=cap)),
        emission_halving_epochs=draw(st.integers(min_value=1, max_value=1000)),
    )


def net_changes(plan: list[Transfer]) -> Counter[str]:
    """Balance change per account a plan causes."""
    delta: Counter[str] = Counter()
    for t in plan:
        delta[t.debit] -= t.amount
        delta[t.credit] += t.amount
    return delta


def assert_no_empty_transfers(plan: list[Transfer]) -> None:
    assert all(t.amount > 0 for t in plan)


# --- payment -------------------------------------------------------------------------------


def test_interval_payment_is_price_times_workers_times_hours() -> None:
    # 1.5 GPC per worker-hour, 4 workers, 30 minutes: 3 GPC.
    assert interval_payment_ugpc(1_500_000, 4, 1_800_000) == 3_000_000
    # Floors to whole µGPC: 1 µGPC/worker-hour for 1 s is 1/3600 µGPC.
    assert interval_payment_ugpc(1, 1, 1000) == 0
    assert interval_payment_ugpc(3_600_000, 1, 1) == 1


def test_interval_payment_refuses_floats_negatives_and_overflow() -> None:
    with pytest.raises(AmountError):
        interval_payment_ugpc(1.5, 1, 1000)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        interval_payment_ugpc(1, -1, 1000)
    with pytest.raises(ValueError):
        interval_payment_ugpc(1, 1, 1.0)  # type: ignore[arg-type]
    with pytest.raises(AmountError):
        interval_payment_ugpc(MAX_AMOUNT_UGPC, 2, 3_600_000)


@given(amounts, tokenomics())
def test_split_payment_sums_exactly(payment: int, tok: TokenomicsPolicy) -> None:
    burn, treasury = split_payment(payment, tok)
    assert burn + treasury == payment
    assert burn >= 0 and treasury >= 0
    assert treasury == payment * tok.treasury_share_bps // 10_000


def test_split_payment_default_shares() -> None:
    assert split_payment(1_000_001, TOK) == (900_001, 100_000)
    with pytest.raises(AmountError):
        split_payment(-1, TOK)


# --- epochs and emission -------------------------------------------------------------------


def test_epochs_follow_the_clock_from_the_genesis_start() -> None:
    us = 1_000_000
    assert epoch_at(1000 * us, 1000, 86400) == 0
    assert epoch_at((1000 + 86400) * us - 1, 1000, 86400) == 0
    assert epoch_at((1000 + 86400) * us, 1000, 86400) == 1
    assert epoch_at((1000 + 10 * 86400 + 5) * us, 1000, 86400) == 10
    assert epoch_at(999 * us, 1000, 86400) == -1
    assert epoch_end_s(0, 1000, 86400) == 1000 + 86400 and epoch_end_s(9, 1000, 10) == 1100


def test_emission_schedule_halves() -> None:
    assert emission_ugpc(0, TOK, 0) == 50_000_000_000
    assert emission_ugpc(364, TOK, 0) == 50_000_000_000
    assert emission_ugpc(365, TOK, 0) == 25_000_000_000
    assert emission_ugpc(3 * 365, TOK, 0) == 6_250_000_000
    assert emission_ugpc(10**12, TOK, 0) == 0
    # Capped by what is left under the cap, and never negative.
    assert emission_ugpc(0, TOK, TOK.hard_cap_ugpc - 7) == 7
    assert emission_ugpc(0, TOK, TOK.hard_cap_ugpc) == 0
    assert emission_ugpc(0, TOK, TOK.hard_cap_ugpc + 5) == 0
    with pytest.raises(ValueError):
        emission_ugpc(-1, TOK, 0)
    with pytest.raises(AmountError):
        emission_ugpc(0, TOK, -1)


@given(tokenomics(), st.integers(min_value=0, max_value=10**7), amounts)
def test_emission_never_takes_supply_past_the_cap(tok: TokenomicsPolicy, epoch: int, supply: int) -> None:
    e = emission_ugpc(epoch, tok, supply)
    assert e >= 0
    assert e <= tok.initial_emission_ugpc
    if supply <= tok.hard_cap_ugpc:
        assert supply + e <= tok.hard_cap_ugpc
    else:
        assert e == 0
    assert emission_ugpc(epoch + 1, tok, supply) <= e


@settings(max_examples=50)
@given(tokenomics(), st.integers(min_value=0, max_value=4000))
def test_minting_every_epoch_never_exceeds_the_cap(tok: TokenomicsPolicy, epochs: int) -> None:
    supply = 0
    for epoch in range(min(epochs, 400)):
        supply += emission_ugpc(epoch, tok, supply)
        assert supply <= tok.hard_cap_ugpc


# --- distributing emission -----------------------------------------------------------------


@st.composite
def settled_intervals(draw: st.DrawFn) -> list[SettledInterval]:
    n = draw(st.integers(min_value=0, max_value=6))
    out = []
    for i in range(n):
        ranks = draw(st.integers(min_value=1, max_value=4))
        out.append(
            SettledInterval(
                receipt_digests=tuple(f"0x{i:032x}{r:032x}" for r in range(ranks)),
                workers=tuple(draw(st.sampled_from(ADDR)) for _ in range(ranks)),
                verifier=draw(st.none() | st.sampled_from(ADDR)),
                payment_ugpc=draw(st.integers(min_value=0, max_value=10**12)),
            )
        )
    return out


def exact_share(emission: int, intervals: list[SettledInterval], iv: SettledInterval, share_bps: int) -> Fraction:
    total = sum(x.payment_ugpc for x in intervals)
    return Fraction(emission * iv.payment_ugpc * share_bps, total * 10_000 * len(iv.receipt_digests))


@given(st.integers(min_value=0, max_value=10**15), settled_intervals(), tokenomics(), st.randoms())
def test_distributed_rewards_are_pro_rata_within_one_ugpc(
    emission: int, intervals: list[SettledInterval], tok: TokenomicsPolicy, rnd: random.Random
) -> None:
    rewards = distribute_emission(emission, intervals, tok)
    assert sum(r.amount_ugpc for r in rewards) <= emission
    assert all(r.amount_ugpc > 0 for r in rewards)
    got = {(r.receipt_digest, r.role): r for r in rewards}
    assert len(got) == len(rewards)
    total = sum(iv.payment_ugpc for iv in intervals)
    for iv in intervals:
        for digest, worker in zip(iv.receipt_digests, iv.workers, strict=True):
            roles = (("worker", tok.worker_share_bps, worker), ("verifier", tok.verifier_share_bps, iv.verifier))
            for role, share, who in roles:
                exact = Fraction(0) if total == 0 or who is None else exact_share(emission, intervals, iv, share)
                r = got.get((digest, role))
                amount = r.amount_ugpc if r else 0
                assert exact - 1 < amount <= exact
                if r:
                    assert r.address == who
    shuffled = list(intervals)
    rnd.shuffle(shuffled)
    assert distribute_emission(emission, shuffled, tok) == rewards


def test_distribution_example() -> None:
    a = SettledInterval(("0x" + "01" * 32, "0x" + "02" * 32), (ADDR[0], ADDR[1]), ADDR[2], 3_000)
    b = SettledInterval(("0x" + "03" * 32,), (ADDR[3],), None, 1_000)
    rewards = distribute_emission(1_000_000, [b, a], TOK)
    # a caused 3/4 of the payment: 750_000 -> 80 % to its 2 workers, 20 % to its verifier, per rank.
    # b caused 1/4: 250_000 -> 200_000 to its worker; unchecked, so its 50_000 verifier share is not minted.
    assert [(r.address, r.amount_ugpc, r.role) for r in rewards] == [
        (ADDR[0], 300_000, "worker"),
        (ADDR[2], 75_000, "verifier"),
        (ADDR[1], 300_000, "worker"),
        (ADDR[2], 75_000, "verifier"),
        (ADDR[3], 200_000, "worker"),
    ]
    assert distribute_emission(1_000_000, [SettledInterval(("0x" + "01" * 32,), (ADDR[0],), None, 0)], TOK) == []
    assert distribute_emission(0, [a], TOK) == []


def test_distribution_refuses_bad_input() -> None:
    d = "0x" + "01" * 32
    with pytest.raises(ValueError):
        SettledInterval((d,), (ADDR[0], ADDR[1]), None, 1)
    with pytest.raises(ValueError):
        SettledInterval((), (), None, 1)
    with pytest.raises(AmountError):
        SettledInterval((d,), (ADDR[0],), None, -5)
    with pytest.raises(ValueError):
        distribute_emission(10, [SettledInterval((d,), (ADDR[0],), None, 1)] * 2, TOK)


# --- slashing and sampling -----------------------------------------------------------------


@given(amounts, bps, bps)
def test_slash_never_exceeds_the_bond_and_sums_exactly(bond: int, fraction: int, whistle: int) -> None:
    sl = SlashingPolicy(fraud_slash_fraction_bps=fraction, whistleblower_share_bps=whistle)
    burned, whistleblower = slash_amounts(bond, sl)
    assert burned >= 0 and whistleblower >= 0
    assert burned + whistleblower == bond * fraction // 10_000 <= bond
    assert whistleblower == (burned + whistleblower) * whistle // 10_000


def test_default_slash() -> None:
    # Half of a 100 GPC bond: 10 GPC to the verifier, 40 GPC burned.
    assert slash_amounts(100_000_000, POLICY.slashing) == (40_000_000, 10_000_000)


# --- settlement plans ----------------------------------------------------------------------


def test_plan_interval_burn_and_mint() -> None:
    plan = plan_interval("job-1", 1_000_001, TOK, DIGEST, [ADDR[0]])
    esc = escrow_account("job-1")
    assert plan == [
        Transfer(esc, BURNED, 900_001, Code.BURN, DIGEST),
        Transfer(esc, TREASURY, 100_000, Code.TREASURY, DIGEST),
    ]
    assert charge_amounts(1_000_001, TOK).fields() == dict(
        paid=1_000_001, burned=900_001, treasury=100_000, minted=0, slashed=0, refunded=0
    )
    assert plan_interval("job-1", 0, TOK, DIGEST) == []


def test_plan_interval_direct_pays_workers_with_remainder_to_rank_0() -> None:
    plan = plan_interval("job-1", 1_000_000, DIRECT, DIGEST, ADDR[:3])
    delta = net_changes(plan)
    # 900_000 to the workers: 300_000 each; 100_000 to the treasury.
    assert [delta[wallet_account(a)] for a in ADDR[:3]] == [300_000] * 3
    assert delta[TREASURY] == 100_000 and delta[BURNED] == 0
    plan = plan_interval("job-1", 1_000_002, DIRECT, DIGEST, ADDR[:3])
    delta = net_changes(plan)
    assert [delta[wallet_account(a)] for a in ADDR[:3]] == [300_002, 300_000, 300_000]
    assert all(t.code in (Code.PAY, Code.TREASURY) for t in plan)
    assert charge_amounts(1_000_002, DIRECT).burned == 0  # the Settlement of a direct payment burns nothing
    with pytest.raises(ValueError):
        plan_interval("job-1", 1_000_000, DIRECT, DIGEST, [])


@given(amounts, st.integers(min_value=1, max_value=64))
def test_split_equally_sums_exactly_with_the_remainder_to_rank_0(amount: int, ranks: int) -> None:
    parts = split_equally(amount, ranks)
    assert sum(parts) == amount and len(parts) == ranks
    assert all(p == parts[-1] for p in parts[1:]) and 0 <= parts[0] - parts[-1] < ranks


@given(tokenomics(), amounts, st.integers(min_value=1, max_value=8))
def test_planned_interval_conserves_and_charges_exactly_the_payment(
    tok: TokenomicsPolicy, payment: int, workers: int
) -> None:
    plan = plan_interval("j", payment, tok, DIGEST, ADDR[:workers])
    assert_no_empty_transfers(plan)
    delta = net_changes(plan)
    assert delta[escrow_account("j")] == -payment
    assert all(t.debit == escrow_account("j") for t in plan)
    amounts_ = charge_amounts(payment, tok)
    assert delta[BURNED] == amounts_.burned and delta[TREASURY] == amounts_.treasury
    if tok.mode == "burn_and_mint":
        assert all(t.code in (Code.BURN, Code.TREASURY) for t in plan)


@given(st.integers(min_value=0, max_value=10**15), settled_intervals(), tokenomics())
def test_planned_mint_credits_exactly_the_rewards(
    emission: int, intervals: list[SettledInterval], tok: TokenomicsPolicy
) -> None:
    rewards = distribute_emission(emission, intervals, tok)
    plan = plan_mint(rewards, DIGEST)
    assert_no_empty_transfers(plan)
    assert -net_changes(plan)[ISSUANCE] == sum(r.amount_ugpc for r in rewards) <= emission
    assert all(t.digest == DIGEST for t in plan)
    assert {t.code for t in plan} <= {Code.MINT_WORKER, Code.MINT_VERIFIER}
    assert all((t.code == Code.MINT_WORKER) == (r.role == "worker") for t, r in zip(plan, rewards, strict=True))


@given(amounts, amounts, st.booleans())
def test_planned_slash_takes_at_most_the_stake_bonded_first(bonded: int, unbonding: int, with_verifier: bool) -> None:
    unbonding = min(unbonding, MAX_AMOUNT_UGPC - bonded)
    verifier = ADDR[1] if with_verifier else None
    burned, whistle = slash_split(bonded + unbonding, POLICY.slashing, whistleblower=with_verifier)
    plan = plan_slash(ADDR[0], verifier, bonded, unbonding, burned, whistle, DIGEST)
    assert_no_empty_transfers(plan)
    delta = net_changes(plan)
    from_bonded = -delta[wallet_account(ADDR[0], "bonded")]
    from_unbonding = -delta[wallet_account(ADDR[0], "unbonding")]
    taken = from_bonded + from_unbonding
    assert taken == sum(slash_amounts(bonded + unbonding, POLICY.slashing)) <= bonded + unbonding
    assert from_bonded == min(taken, bonded)  # bonded stake goes first
    assert delta[BURNED] == burned and delta[wallet_account(ADDR[1])] == whistle
    if verifier is None:
        assert delta[BURNED] == taken


def test_slash_refuses_a_verifier_slashing_itself_and_more_than_the_stake() -> None:
    with pytest.raises(ValueError):
        plan_slash(ADDR[0], ADDR[0].upper().replace("0X", "0x"), 100_000_000, 0, 40, 10, DIGEST)
    with pytest.raises(ValueError):
        plan_slash(ADDR[0], ADDR[1], 30, 10, 40, 1, DIGEST)


def test_plan_genesis_mints_each_allocation() -> None:
    allocations = [{"recipient": ADDR[0], "amount": 5}, {"recipient": ADDR[1], "amount": 7}]
    assert plan_genesis(allocations, DIGEST) == [
        Transfer(ISSUANCE, wallet_account(ADDR[0]), 5, Code.GENESIS, DIGEST),
        Transfer(ISSUANCE, wallet_account(ADDR[1]), 7, Code.GENESIS, DIGEST),
    ]


def test_simple_plans_move_the_right_accounts() -> None:
    a = ADDR[0]
    cases = [
        (plan_escrow("j", a, 5, DIGEST), wallet_account(a), escrow_account("j"), Code.ESCROW),
        (plan_refund("j", a, 5, DIGEST), escrow_account("j"), wallet_account(a), Code.REFUND),
        (plan_bond(a, 5, DIGEST), wallet_account(a), wallet_account(a, "bonded"), Code.BOND),
        (plan_unbond(a, 5, DIGEST), wallet_account(a, "bonded"), wallet_account(a, "unbonding"), Code.UNBOND),
        (plan_withdraw(a, 5, DIGEST), wallet_account(a, "unbonding"), wallet_account(a), Code.WITHDRAW),
        (plan_faucet(a, 5, DIGEST), ISSUANCE, wallet_account(a), Code.FAUCET),
    ]
    for plan, debit, credit, code in cases:
        assert plan == [Transfer(debit, credit, 5, code, DIGEST)]
    assert plan_refund("j", a, 0, DIGEST) == []
    with pytest.raises(AmountError):
        plan_escrow("j", a, -1, DIGEST)
    with pytest.raises(AmountError):
        plan_bond(a, 2.5, DIGEST)  # type: ignore[arg-type]
    with pytest.raises(UnknownAccount):
        plan_faucet("not-an-address", 5, DIGEST)
