"""EIP-712 sign and verify rates, gpucoin vs plain eth-account: ``python -m benchmarks.signatures.run``."""
