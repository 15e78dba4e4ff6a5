"""A client of the head's HTTP API (``gpucoin.head.api``): JSON in, typed records out."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter

from gpucoin.exceptions import HeadError
from gpucoin.head.records import (
    AccountView,
    FaucetRequest,
    FaucetResult,
    HeadStatus,
    NodeView,
    RegisterRequest,
    SignedRequest,
)
from gpucoin.jsonsafe import dumps as js_safe_dumps

REQUEST_TIMEOUT_S = 30.0
"""Timeout of one HTTP request to the head."""

MAX_BODY_BYTES = 16 << 20
"""The largest answer read from the head."""

T = TypeVar("T")


class HeadClient:
    """Requests to the head at ``api_url`` (``http(s)://host:port``).

    Every method raises ``HeadError`` when the head cannot be reached, refuses (its one-line
    ``detail`` is quoted) or answers outside the expected record.
    """

    def __init__(self, api_url: str):
        self.api_url = api_url.rstrip("/")

    def _call(self, method: str, path: str, body: BaseModel | None, shape: Any) -> Any:
        data = None if body is None else js_safe_dumps(body.model_dump(mode="json")).encode()
        req = urllib.request.Request(
            f"{self.api_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:  # noqa: S310 - http(s), checked by api_url_of
                raw = r.read(MAX_BODY_BYTES)
        except urllib.error.HTTPError as e:
            raise HeadError(f"the head refused {method} {path} ({e.code}): {_detail(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise HeadError(f"cannot reach the head at {self.api_url}: {getattr(e, 'reason', e)}") from None
        try:
            return TypeAdapter(shape).validate_json(raw)
        except ValueError as e:
            raise HeadError(
                f"the head at {self.api_url} answered outside {path}'s schema: {str(e).splitlines()[0]}"
            ) from None

    def status(self) -> HeadStatus:
        """``GET /v1/status``."""
        return self._call("GET", "/v1/status", None, HeadStatus)

    def nodes(self) -> list[NodeView]:
        """``GET /v1/nodes``."""
        return self._call("GET", "/v1/nodes", None, list[NodeView])

    def register(self, registration: dict) -> NodeView:
        """``POST /v1/nodes`` with a signed NodeRegistration (``SignedMessage`` as a dict)."""
        return self._call("POST", "/v1/nodes", RegisterRequest(registration=registration), NodeView)

    def faucet(self, recipient: str, amount_ugpc: int, request_id: str) -> FaucetResult:
        """``POST /v1/faucet`` (a dev head only)."""
        req = FaucetRequest(recipient=recipient, amount_ugpc=amount_ugpc, request_id=request_id)
        return self._call("POST", "/v1/faucet", req, FaucetResult)

    def account(self, address: str) -> AccountView:
        """``GET /v1/accounts/{address}``."""
        return self._call("GET", f"/v1/accounts/{urllib.parse.quote(address)}", None, AccountView)

    def unbond(self, message: dict) -> AccountView:
        """``POST /v1/unbond`` with a signed Unbond (``SignedMessage`` as a dict)."""
        return self._call("POST", "/v1/unbond", SignedRequest(message=message), AccountView)

    def withdraw(self, message: dict) -> AccountView:
        """``POST /v1/withdraw`` with a signed Withdraw (``SignedMessage`` as a dict)."""
        return self._call("POST", "/v1/withdraw", SignedRequest(message=message), AccountView)


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(e.read(1 << 16)).get("detail")
    except (ValueError, AttributeError, OSError):
        return e.reason
    if isinstance(detail, list):  # FastAPI's validation errors: the first one, in one line
        first = detail[0] if detail else {}
        return f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg', '')}"
    return str(detail)
