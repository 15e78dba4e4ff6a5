"""The security suite runs its ledger tests on both backends, with the ledger suite's fixtures."""

from tests.ledger.conftest import backend, ledger, ledger_url  # noqa: F401 - pytest finds fixtures by name
