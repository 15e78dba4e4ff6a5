"""The authorization rules as pure functions of the facts (gpucoin.ledger.authorize): no database.

The ledger suites drive the same rules through ``Ledger.post`` on both backends; here each rule is
checked directly against hand-built ``Facts``, which is also how the audit calls them.
"""

from __future__ import annotations

import pytest

from gpucoin.exceptions import InsufficientFunds, LedgerError, StaleEpoch, Unauthorized
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, escrow_account, wallet_account
from gpucoin.ledger.authorize import accounts_read, authorize_operation, groups_of
from gpucoin.ledger.facts import Charge, Close, Facts, GenesisInfo, Msg, Slash
from gpucoin.ledger.plans import charge_amounts, plan_escrow, plan_interval, plan_slash, slash_split
from gpucoin.ledger.state import LedgerState
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy, policy_hash
from gpucoin.policy.tokenomics import SettledInterval

POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
PH = policy_hash(POLICY)
W1, W2, V, X, C = ("0x" + "a1" * 20, "0x" + "a2" * 20, "0x" + "be" * 20, "0x" + "ee" * 20, "0x" + "c0" * 20)


def d(tag: str) -> str:
    return "0x" + tag.encode().hex().ljust(64, "0")[:64]


VETTED = POLICY.verification.vetted_packages[0]


def facts(dev: bool = True, now_epoch: int = 5, policy=POLICY, package: str = VETTED, fail: bool = True) -> Facts:
    g = GenesisInfo(d("genesis"), C, C, dev, 1_000, policy, policy_hash(policy))
    f = Facts(g, now_epoch)
    order = {"consumer": X, "jobId": "j", "workers": 2, "budget": 10**9, "packageHash": package}
    f.add_message(Msg(d("order"), "JobOrder", X, order))
    for rank, w in enumerate((W1, W2)):
        f.add_message(
            Msg(
                d(f"r{rank}"), "WorkReceipt", w, {"jobId": "j", "worker": w, "rank": rank, "stepStart": 0, "stepEnd": 4}
            )
        )
        f.add_message(
            Msg(
                d(f"pass{rank}"),
                "VerificationReport",
                V,
                {"verifier": V, "receiptDigest": d(f"r{rank}"), "verdict": "pass"},
            )
        )
    if fail:  # the verifier also convicted rank 1
        f.add_message(
            Msg(d("fail"), "VerificationReport", V, {"verifier": V, "receiptDigest": d("r1"), "verdict": "fail"})
        )
    return f


def settlement(f: Facts, name: str, subject: str, epoch: int = 5, **amounts: int) -> Msg:
    fields = {
        "coordinator": C,
        "jobId": "j",
        "subject": subject,
        "epoch": epoch,
        "policyHash": PH,
        **{k: 0 for k in ("paid", "burned", "treasury", "minted", "slashed", "refunded")},
        **amounts,
    }
    m = Msg(d(name), "Settlement", C, fields)
    f.add_message(m)
    return m


def state(**balances: int) -> LedgerState:
    s = LedgerState({escrow_account("j"): 10**9, wallet_account(X): 0, ISSUANCE: -(10**9), **balances})
    from gpucoin.ledger.state import Escrow

    s.escrows[escrow_account("j")] = Escrow(wallet_account(X), 10**9)
    return s


def test_a_checked_charge_splits_by_the_policy_and_counts_in_its_epoch() -> None:
    f = facts(fail=False)
    st = settlement(f, "st", d("pass0"), **charge_amounts(1_000_001, POLICY.tokenomics).fields())
    plan = plan_interval("j", 1_000_001, POLICY.tokenomics, st.digest)
    new, effects, used = authorize_operation(state(), f, plan)
    assert new.balances[BURNED] == 900_001 and new.balances[TREASURY] == 100_000
    (charge,) = effects
    assert charge == Charge(st.digest, "j", 0, 0, 5, SettledInterval((d("r0"), d("r1")), (W1, W2), V, 1_000_001))
    assert used == {st.digest}
    f.apply(effects, used)
    again = settlement(f, "again", d("r0"), **charge_amounts(5, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="already charged"):
        authorize_operation(new, f, plan_interval("j", 5, POLICY.tokenomics, again.digest))


def test_a_charge_must_name_the_current_epoch_and_policy_and_fit_the_escrow() -> None:
    f = facts()
    amounts = charge_amounts(10, POLICY.tokenomics).fields()
    with pytest.raises(StaleEpoch, match="epoch 4; the ledger's clock is in epoch 5"):
        authorize_operation(
            state(), f, plan_interval("j", 10, POLICY.tokenomics, settlement(f, "a", d("r0"), 4, **amounts).digest)
        )
    other = settlement(f, "b", d("r0"), **amounts)
    f.messages[other.digest] = Msg(other.digest, "Settlement", C, {**other.fields, "policyHash": d("other")})
    with pytest.raises(Unauthorized, match="signed under policy"):
        authorize_operation(state(), f, plan_interval("j", 10, POLICY.tokenomics, other.digest))
    big = settlement(f, "c", d("r0"), **charge_amounts(10**9 + 1, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="the escrow holds 1000000000"):
        authorize_operation(state(), f, plan_interval("j", 10**9 + 1, POLICY.tokenomics, big.digest))


def test_a_charge_needs_every_rank_and_for_a_check_every_ranks_verdict() -> None:
    f = facts()
    del f.interval_receipts[("j", 0, 0)][1]
    st = settlement(f, "st", d("r0"), **charge_amounts(10, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match=r"receipts of ranks \[0\]; the job has 2 ranks"):
        authorize_operation(state(), f, plan_interval("j", 10, POLICY.tokenomics, st.digest))
    f = facts()
    f.reports[d("r1")] = []  # rank 1 was not judged
    st = settlement(f, "st", d("pass0"), **charge_amounts(10, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="rank 1's receipt has no passing or failing report"):
        authorize_operation(state(), f, plan_interval("j", 10, POLICY.tokenomics, st.digest))


def test_a_slash_takes_the_policys_share_of_bonded_then_unbonding_stake_once() -> None:
    f = facts()
    bonded, unbonding = wallet_account(W2, "bonded"), wallet_account(W2, "unbonding")
    s = state(**{bonded: 30, unbonding: 70})
    s.unbonding[unbonding] = {9: 70}
    burned, whistle = slash_split(100, POLICY.slashing, whistleblower=True)
    st = settlement(f, "slash", d("fail"), burned=burned, slashed=burned + whistle)
    assert accounts_read(st, f) == {bonded, unbonding}
    plan = plan_slash(W2, V, 30, 70, burned, whistle, st.digest)
    new, (effect,), _ = authorize_operation(s, f, plan)
    assert effect == Slash(st.digest, d("r1"), d("fail"))
    assert (new.balances[bonded], new.balances[unbonding], new.balances[wallet_account(V)]) == (0, 50, whistle)
    f.apply([effect], {st.digest})
    st2 = settlement(f, "slash2", d("fail"), burned=burned, slashed=burned + whistle)
    with pytest.raises(Unauthorized, match="already slashed"):
        authorize_operation(s, f, plan_slash(W2, V, 30, 70, burned, whistle, st2.digest))


def test_a_void_report_of_a_vetted_package_settles_nothing() -> None:
    f = facts()
    f.add_message(Msg(d("void"), "VerificationReport", V, {"verifier": V, "receiptDigest": d("r1"), "verdict": "void"}))
    burned, whistle = slash_split(100, POLICY.slashing, whistleblower=True)
    st = settlement(f, "st", d("void"), burned=burned, slashed=burned + whistle)
    s = state(**{wallet_account(W2, "bonded"): 100})
    with pytest.raises(Unauthorized, match="a void interval of it is nobody's to pay"):
        authorize_operation(s, f, plan_slash(W2, V, 100, 0, burned, whistle, st.digest))


def test_epochs_close_after_they_end_in_order_once_and_only_with_work() -> None:
    f = facts(now_epoch=5)
    iv = SettledInterval((d("r0"),), (W1,), None, 100)
    f.epoch_charges[3] = [Charge(d("x"), "j", 0, 0, 3, iv)]
    from gpucoin.ledger.epochs import plan_epoch
    from gpucoin.ledger.plans import plan_mint

    def close(epoch: int, name: str) -> tuple[Msg, list[Transfer]]:
        p = plan_epoch(epoch, [c.interval for c in f.epoch_charges.get(epoch, [])], POLICY.tokenomics, 0)
        m = Msg(
            d(name),
            "EpochClose",
            C,
            {
                "coordinator": C,
                "epoch": epoch,
                "emission": p.emission,
                "minted": p.minted,
                "payments": p.payments,
                "policyHash": PH,
            },
        )
        f.add_message(m)
        return m, plan_mint(p.rewards, m.digest) or [
            Transfer(ISSUANCE, wallet_account(W1), 1, Code.MINT_WORKER, m.digest)
        ]

    s = LedgerState({ISSUANCE: 0, BURNED: 0})
    m, plan = close(3, "c3")
    _, effects, used = authorize_operation(s, f, plan)
    assert effects == [Close(m.digest, 3, POLICY.tokenomics.initial_emission_ugpc, sum(t.amount for t in plan), 100)]
    f.apply(effects, used)
    for epoch, why in (
        (3, "already closed"),
        (2, "epochs close in order"),
        (4, "no interval was charged"),
        (5, "ends at"),
    ):
        _, plan = close(epoch, f"again{epoch}")
        with pytest.raises(Unauthorized, match=why):
            authorize_operation(s, f, plan)


def test_runs_of_a_message_are_contiguous_and_a_message_authorizes_only_its_codes() -> None:
    a, b = (
        Transfer(ISSUANCE, wallet_account(W1), 1, Code.FAUCET, d("f")),
        Transfer(ISSUANCE, wallet_account(W2), 1, Code.FAUCET, d("g")),
    )
    assert [(g, i) for g, i, _ in groups_of([a, b])] == [(d("f"), 0), (d("g"), 1)]
    with pytest.raises(Unauthorized, match="apart from the other transfers"):
        groups_of([a, b, a])
    f = facts()
    with pytest.raises(LedgerError, match="names no recorded message"):
        authorize_operation(state(), f, [a])
    with pytest.raises(Unauthorized, match="cites a WorkReceipt, which authorizes no transfer"):
        authorize_operation(state(), f, [Transfer(ISSUANCE, wallet_account(W1), 1, Code.FAUCET, d("r0"))])
    f.add_message(Msg(d("f"), "Faucet", C, {"recipient": W1, "amount": 1}))
    authorize_operation(state(), f, [a])
    with pytest.raises(Unauthorized, match="not dev"):
        g = facts(dev=False)
        g.add_message(Msg(d("f"), "Faucet", C, {"recipient": W1, "amount": 1}))
        authorize_operation(state(), g, [a])
    # authorized, the money rules still apply: the consumer cannot afford its own order's budget
    f.add_message(Msg(d("order2"), "JobOrder", X, {"consumer": X, "jobId": "j2", "workers": 1, "budget": 10**9}))
    with pytest.raises(InsufficientFunds):
        authorize_operation(state(), f, plan_escrow("j2", X, 10**9, d("order2")))


UNVETTED = "0x" + "ab" * 32


def voided(f: Facts, ranks=(0, 1), verifier: str = V) -> None:
    for rank in ranks:
        f.add_message(
            Msg(
                d(f"void{rank}{verifier[-2:]}"),
                "VerificationReport",
                verifier,
                {"verifier": verifier, "receiptDigest": d(f"r{rank}"), "verdict": "void"},
            )
        )


def test_a_failing_report_slashes_nobody_in_a_job_of_an_unvetted_package() -> None:
    """There a fail counts as void (``effective_verdict``): the whole interval is charged to the
    submitter and burned, never a slash (the verifier's process ran the submitter's code)."""
    from gpucoin.ledger.facts import VoidCharge
    from gpucoin.ledger.plans import SettlementAmounts, plan_void_charge

    f = facts(package=UNVETTED)  # rank 0 passed, rank 1 failed
    burned, whistle = slash_split(500, POLICY.slashing, whistleblower=True)
    st = settlement(f, "st", d("fail"), burned=burned, slashed=burned + whistle)
    plan = plan_slash(W2, V, 500, 0, burned, whistle, st.digest)
    with pytest.raises(Unauthorized, match="void steps 0-4"):
        authorize_operation(state(**{wallet_account(W2, "bonded"): 500}), f, plan)
    st = settlement(f, "st2", d("fail"), **SettlementAmounts(paid=7_000, burned=7_000).fields())
    _, effects, _ = authorize_operation(state(), f, plan_void_charge("j", 7_000, st.digest))
    assert effects == [VoidCharge(st.digest, "j", 0, 0, 5, 7_000)]
    # a pass voids nothing
    st = settlement(f, "st3", d("pass0"), **SettlementAmounts(paid=7_000, burned=7_000).fields())
    with pytest.raises(Unauthorized):
        authorize_operation(state(), f, plan_void_charge("j", 7_000, st.digest))
    # nor is rank 0 paid on its pass as if rank 1 had been convicted: the interval is void
    st = settlement(f, "st4", d("pass0"), **charge_amounts(500, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="judged void"):
        authorize_operation(state(), f, plan_interval("j", 500, POLICY.tokenomics, st.digest))


def test_a_void_interval_of_an_unvetted_package_is_charged_and_all_of_it_burned() -> None:
    from gpucoin.ledger.facts import VoidCharge
    from gpucoin.ledger.plans import SettlementAmounts, plan_void_charge

    f = facts(package=UNVETTED)
    voided(f)
    st = settlement(f, "st", d("void0" + V[-2:]), **SettlementAmounts(paid=7_000, burned=7_000).fields())
    new, effects, _ = authorize_operation(state(), f, plan_void_charge("j", 7_000, st.digest))
    assert effects == [VoidCharge(st.digest, "j", 0, 0, 5, 7_000)]
    assert new.balances[BURNED] == 7_000 and new.balances[escrow_account("j")] == 10**9 - 7_000
    assert accounts_read(st, f) == {escrow_account("j")}
    # once: neither a second void charge nor a charge of the same interval afterwards
    f.apply(effects, {st.digest})
    again = settlement(f, "again", d("void1" + V[-2:]), **SettlementAmounts(paid=1, burned=1).fields())
    with pytest.raises(Unauthorized, match="already charged"):
        authorize_operation(new, f, plan_void_charge("j", 1, again.digest))
    paid = settlement(f, "paid", d("r0"), **charge_amounts(1_000, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="already charged"):
        authorize_operation(new, f, plan_interval("j", 1_000, POLICY.tokenomics, paid.digest))


def test_a_void_charge_needs_an_unvetted_package_a_void_for_every_rank_and_all_of_it_burned() -> None:
    from gpucoin.ledger.plans import SettlementAmounts, plan_void_charge

    amounts = SettlementAmounts(paid=7_000, burned=7_000).fields()
    f = facts()  # the vetted main job: a void interval there is nobody's to pay
    voided(f)
    st = settlement(f, "st", d("void0" + V[-2:]), **amounts)
    with pytest.raises(Unauthorized, match="vetted package"):
        authorize_operation(state(), f, plan_void_charge("j", 7_000, st.digest))
    f = facts(package=UNVETTED)
    other = "0x" + "7e" * 20  # a second verifier voided rank 0 and never judged rank 1
    voided(f, ranks=(0,), verifier=other)
    st = settlement(f, "st", d("void0" + other[-2:]), **amounts)
    with pytest.raises(Unauthorized, match="rank 1's receipt has no report by"):
        authorize_operation(state(), f, plan_void_charge("j", 7_000, st.digest))
    f = facts(package=UNVETTED)
    voided(f)
    st = settlement(f, "st", d("void0" + V[-2:]), paid=7_000, burned=6_300, treasury=700)
    with pytest.raises(Unauthorized, match="burned"):  # a treasury cut is not what the rule allows
        authorize_operation(state(), f, plan_void_charge("j", 7_000, st.digest))


def test_of_an_interval_with_a_convicted_rank_only_the_cleared_ranks_are_paid() -> None:
    f = facts()  # rank 0 passed, rank 1 was convicted by the same verifier
    st = settlement(f, "st", d("pass0"), **charge_amounts(500, POLICY.tokenomics).fields())
    _, (effect,), _ = authorize_operation(state(), f, plan_interval("j", 500, POLICY.tokenomics, st.digest))
    assert effect.interval == SettledInterval((d("r0"),), (W1,), V, 500)
    # the convicted rank's pass is no subject of a charge
    st = settlement(f, "st1", d("pass1"), **charge_amounts(500, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="convicted"):
        authorize_operation(state(), f, plan_interval("j", 500, POLICY.tokenomics, st.digest))
    # a rank neither cleared nor convicted by that verifier leaves the interval unchargeable
    g = facts(fail=False)
    g.add_message(Msg(d("x"), "VerificationReport", X, {"verifier": X, "receiptDigest": d("r0"), "verdict": "pass"}))
    st = settlement(g, "st2", d("x"), **charge_amounts(500, POLICY.tokenomics).fields())
    with pytest.raises(Unauthorized, match="rank 1's receipt has no passing or failing report"):
        authorize_operation(state(), g, plan_interval("j", 500, POLICY.tokenomics, st.digest))
