"""The head: a Ray head node and gpucoin's head service (ledger, coordinator key, HTTP API, metrics).

``lifecycle`` starts and stops them (``gpucoin up`` / ``down``) and asks a running head for its
status; ``service`` is the head service process; ``metrics`` its Prometheus collectors;
``records`` the typed records they exchange.
"""

from gpucoin.head.lifecycle import UpOptions, api_url_of, down, fetch_status, read_info, up
from gpucoin.head.records import HeadInfo, HeadStatus, ServiceConfig

__all__ = [
    "HeadInfo",
    "HeadStatus",
    "ServiceConfig",
    "UpOptions",
    "api_url_of",
    "down",
    "fetch_status",
    "read_info",
    "up",
]
