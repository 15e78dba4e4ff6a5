"""The head's Prometheus metrics (``GET /metrics``), read from the ledger at each scrape.

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/): a
``gpucoin_`` prefix, the unit in the name, ``_total`` on counters. Money is in µGPC (``_ugpc``):
gpucoin's unit everywhere, exact in a float64 sample up to 2**53 µGPC (9 billion GPC).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpucoin.exceptions import HeadError
from gpucoin.head.ray_state import RayNode
from gpucoin.ledger import Ledger


class LedgerCollector(Collector):
    """Market metrics computed from the ledger (and Ray's view of the nodes) on each scrape, so
    there is no state of its own to lose.

    Args:
        ledger: the head's ledger.
        ray_nodes: reads Ray's nodes by id; None leaves ``gpucoin_nodes`` out.
    """

    def __init__(self, ledger: Ledger, ray_nodes: Callable[[], Mapping[str, RayNode]] | None = None):
        self.ledger = ledger
        self.ray_nodes = ray_nodes

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (one ledger read for totals, one for counts)."""
        totals = self.ledger.totals()
        counts = self.ledger.market_counts()
        for name, key, doc in (
            ("gpucoin_minted_ugpc", "minted", "µGPC ever minted (Genesis allocations, faucet, emission)"),
            ("gpucoin_burned_ugpc", "burned", "µGPC ever burned"),
            ("gpucoin_slashed_ugpc", "slashed", "µGPC ever slashed from bonds"),
        ):
            yield CounterMetricFamily(name, doc, value=totals[key])
        yield GaugeMetricFamily("gpucoin_supply_ugpc", "µGPC in circulation (minted - burned)", value=totals["supply"])
        yield GaugeMetricFamily("gpucoin_bonded_stake_ugpc", "µGPC bonded by volunteers", value=counts["bonded"])
        yield GaugeMetricFamily(
            "gpucoin_epoch", "the ledger's current emission epoch", value=self.ledger.current_epoch()
        )
        receipts = CounterMetricFamily(
            "gpucoin_receipts_checked", "WorkReceipts checked, by verdict", labels=["verdict"]
        )
        for verdict, n in sorted(counts["verdicts"].items()):
            receipts.add_metric([verdict], n)
        yield receipts
        messages = CounterMetricFamily("gpucoin_messages", "signed messages the ledger holds, by type", labels=["type"])
        for kind, n in sorted(counts["messages"].items()):
            messages.add_metric([kind], n)
        yield messages
        yield from self._jobs()
        if self.ray_nodes is not None:
            yield from self._nodes()

    def _jobs(self) -> Iterator[Metric]:
        from gpucoin.head.jobs import JobTable
        from gpucoin.head.records import JobState

        rows = JobTable(self.ledger.engine).all()
        jobs = GaugeMetricFamily("gpucoin_jobs", "jobs on the head, by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], sum(r.state == state.value for r in rows))
        yield jobs

    def _nodes(self) -> Iterator[Metric]:
        from gpucoin.head.api import node_views
        from gpucoin.head.records import NodeState

        try:
            views = node_views(self.ledger, self.ray_nodes())
        except HeadError:
            return  # Ray's view cannot be read now: leave the family out rather than fail the scrape
        nodes = GaugeMetricFamily("gpucoin_nodes", "registered nodes, by state in Ray's view", labels=["state"])
        for state in NodeState:
            nodes.add_metric([state.value], sum(v.state == state for v in views))
        yield nodes


class HeadMetrics:
    """The head's registry (not the process-global default one): the ledger's metrics read at each
    scrape, and what the market loop and the running jobs observe as they go.

    Attributes:
        clearing_seconds: histogram of one market round's ``clear`` call, seconds.
        samples_per_second: per running job, training samples (sequences) per second, as rank 0's
            progress reports show it; removed when the job ends.
    """

    def __init__(self, ledger: Ledger, ray_nodes: Callable[[], Mapping[str, RayNode]] | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(LedgerCollector(ledger, ray_nodes))
        self.clearing_seconds = Histogram(
            "gpucoin_market_clearing_seconds",
            "time to clear one market round",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=self.registry,
        )
        self.samples_per_second = Gauge(
            "gpucoin_job_samples_per_second",
            "training samples per second of a running job",
            ["job_id"],
            registry=self.registry,
        )


def metrics_registry(ledger: Ledger, ray_nodes: Callable[[], Mapping[str, RayNode]] | None = None) -> CollectorRegistry:
    """A registry holding the head's collectors (``HeadMetrics``)."""
    return HeadMetrics(ledger, ray_nodes).registry
