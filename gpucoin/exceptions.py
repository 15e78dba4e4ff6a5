"""Every error gpucoin raises on purpose, in one hierarchy.

    GpucoinError                      base; the CLI prints it as one line and exits non-zero
    ├── SpecError                     a job spec that does not load or validate
    ├── PolicyError                   an incentive policy that does not load or validate
    ├── AmountError                   a malformed, negative, fractional or overflowing amount
    ├── SignatureError                a signed message that does not verify
    │   ├── DomainMismatch            signed in another market's EIP-712 domain
    │   └── MessageExpired            a JobOrder or NodeRegistration past its deadline
    ├── WalletError                   a keystore that cannot be read, created or unlocked
    ├── LedgerError                   a ledger write refused; nothing was changed
    │   ├── InsufficientFunds         a debit would take a user account below zero
    │   ├── ConflictError             an operation id reused with different content, a second
    │   │   │                         JobOrder for one job
    │   │   └── NonceReused           a (signer, nonce) another stored message already used
    │   ├── RuleViolation             a transfer the money rules forbid (wrong accounts for its
    │   │                             code, a closed escrow, stake not yet unbonded)
    │   ├── Unauthorized              a transfer its cited signed message does not authorize (wrong
    │   │   │                         type, signer, amount or recipient; a message used twice; a
    │   │   │                         faucet outside a dev market; an epoch closed early or twice)
    │   │   └── StaleEpoch            a Settlement signed for another epoch than the ledger's current one
    │   ├── NoGenesis                 a ledger with no Genesis message yet, or a second Genesis
    │   ├── StoredPolicyOutdated      the policy a ledger is bound to fails this gpucoin's policy
    │   │                             schema (written by an older version)
    │   ├── ReceiptOutOfOrder         a WorkReceipt whose steps overlap, leave a gap or do not
    │   │                             chain to its rank's previous receipt
    │   ├── UnknownParty              a WorkReceipt for a job or worker the ledger does not know
    │   └── UnknownAccount            an account name of no known form
    ├── MarketError                   the market cannot place a job
    │   └── NoPlacement               not enough admissible nodes for an all-or-nothing job
    ├── ClusterError                  the Ray cluster could not be started, reached or stopped
    ├── HeadError                     the head (``gpucoin up``) could not be started, reached or
    │   │                             stopped, or is not running where it was asked for
    │   ├── NodeRefused               a node registration the head does not admit (no live Ray
    │   │                             node of that id, the head node, another provider's node)
    │   └── UnknownJob                no job (or no replay, no launch) of that id on the head
    ├── TrainingError                 a training run failed on the workers
    ├── JobCodeError                  the job's own code, run for the head in a child process,
    │                                 failed, hung or answered outside its schema
    ├── StorageError                  the checkpoint store refused an object or cannot serve one
    │   ├── ObjectMissing             no stored object has that digest
    │   └── ObjectCorrupted           a stored object no longer hashes to its name (the store's fault)
    └── VerificationError             a replay could not be carried out (not a failed check)
        └── BadCommittedFile          a file a rank committed to (by its receipt) is missing,
                                      malformed, unloadable or not what its manifest names: the
                                      rank's own failure, settled as a failed check

A failed spot check is not an exception: it is a verdict the ledger settles.
"""

from __future__ import annotations


class GpucoinError(Exception):
    """Base of every error gpucoin raises on purpose (a user mistake or a refused action)."""


class SpecError(GpucoinError):
    """A job spec that cannot be read or does not fit the closed schema."""


class PolicyError(GpucoinError):
    """An incentive policy that cannot be read or fails validation."""


class AmountError(GpucoinError, ValueError):
    """An amount that is not a non-negative whole number of µGPC within int64."""


class SignatureError(GpucoinError):
    """A signed message whose signature, signer or domain does not check."""


class DomainMismatch(SignatureError):
    """A message signed in another EIP-712 domain (name, version, chainId or verifyingContract)
    than the market's: valid elsewhere, so accepting it here would allow a cross-market replay."""


class MessageExpired(SignatureError):
    """A JobOrder or NodeRegistration presented after its ``deadline`` (unix seconds)."""


class WalletError(GpucoinError):
    """A wallet keystore that cannot be created, read or unlocked."""


class LedgerError(GpucoinError):
    """A ledger write that was refused; the ledger is unchanged."""


class StoredPolicyOutdated(LedgerError):
    """The policy a ledger's Genesis binds is stored intact but fails this gpucoin's policy schema
    (a ledger written under an older schema, e.g. before a policy section was added)."""


class InsufficientFunds(LedgerError):
    """A transfer would take a user account below zero."""


class ConflictError(LedgerError):
    """An operation id was reused with different content (a retry must repeat the same content)."""


class NonceReused(ConflictError):
    """A message whose (signer, nonce) another stored message already used: a replay."""


class ReceiptOutOfOrder(LedgerError):
    """A WorkReceipt whose step range overlaps or leaves a gap after its rank's receipts, or whose
    ``previousReceipt`` is not that rank's latest receipt."""


class UnknownParty(LedgerError):
    """A WorkReceipt for a job with no recorded JobOrder or a worker with no NodeRegistration."""


class RuleViolation(LedgerError):
    """A transfer the money rules forbid: accounts that do not fit its code, a post to a closed
    escrow, a refund that is not the whole remainder, a withdrawal before the unbonding period."""


class Unauthorized(LedgerError):
    """A transfer that its cited signed message does not authorize: a message of the wrong type or
    signer for the transfer's code, amounts or accounts other than the message's, a message that
    already authorized another operation, a FAUCET in a market whose Genesis is not ``dev``, or an
    epoch closed before it ended, twice, or with other emission than the policy's
    (docs/ledger.md, Authorization)."""


class StaleEpoch(Unauthorized):
    """A Settlement whose ``epoch`` is not the ledger's current epoch (its clock moved on while the
    coordinator signed): sign it again with ``Ledger.current_epoch()``."""


class NoGenesis(LedgerError):
    """The ledger has no Genesis message, so it admits no other message and no transfer yet; or a
    second, different Genesis was offered to a ledger that has one."""


class UnknownAccount(LedgerError):
    """An account name the ledger does not know or cannot parse."""


class MarketError(GpucoinError):
    """The market cannot clear a job."""


class NoPlacement(MarketError):
    """Too few admissible nodes (ask <= bid, bond >= minimum) for an all-or-nothing job."""


class ClusterError(GpucoinError):
    """The Ray cluster could not be started, reached or stopped."""


class HeadError(GpucoinError):
    """The head (``gpucoin up``) could not be started, reached or stopped, or is not running."""


class NodeRefused(HeadError):
    """A NodeRegistration the head does not admit: its node id is no live Ray node of the cluster,
    is the head node, or is registered by another provider."""


class UnknownJob(HeadError):
    """The head has no job of that id, or none in the state asked about (no launch before it is
    placed, no replay it drew)."""


class JobCodeError(GpucoinError):
    """The job's own code, run for the head in a child process (``coordinator.jobcode``), failed,
    hung or answered outside its schema."""


class TrainingError(GpucoinError):
    """Training failed on the workers."""


class VerificationError(GpucoinError):
    """A replay could not be carried out (missing checkpoint, bad hash); not a failed check."""


class StorageError(GpucoinError):
    """The checkpoint store refused an object (too large, malformed digest) or cannot serve one."""


class ObjectMissing(StorageError):
    """No object with the asked digest is stored (it was never put)."""


class ObjectCorrupted(StorageError):
    """A stored object whose bytes no longer hash to its name: the store was tampered with or
    its disk failed (the head's fault, never a rank's)."""


class BadCommittedFile(VerificationError):
    """A checkpoint file or manifest that a rank's receipt commits to and that cannot serve: not
    stored, not what the manifest names, not the files the rank must write, refused by the
    weights-only load, or at odds with DeepSpeed's layout. The rank that signed it failed.

    Attributes:
        name: the file (or ``"manifest"``) at fault.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
