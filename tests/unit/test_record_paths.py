"""A head's or a node's record names the temp dir whose processes ``down``/``leave`` end and which
they remove: a record edited to name another path (``/``, a home) is refused before anything is
signalled or removed."""

from __future__ import annotations

import json

import pytest

from gpucoin.cluster import join as joining
from gpucoin.cluster.embedded import check_short_temp_dir, short_temp_dir
from gpucoin.exceptions import HeadError
from gpucoin.head import lifecycle

REF = {"pid": 1, "create_time": 0.0}


def test_a_dir_short_temp_dir_made_passes() -> None:
    d = short_temp_dir("gpucoin-node-")
    try:
        assert check_short_temp_dir(d, "gpucoin-node-") == d
    finally:
        d.rmdir()


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/tmp",
        "/tmp/gpucoin-node-",
        "/root",
        "relative/gpucoin-node-x",
        "/tmp/x/gpucoin-node-y",
        "/tmp/gpucoin-head-x",
    ],
)
def test_any_other_path_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="is not a gpucoin-node-"):
        check_short_temp_dir(path, "gpucoin-node-")


def _node_record(temp_dir: str) -> dict:
    return {
        "name": "vol0",
        "node_id": "ab" * 28,
        "provider": "0x" + "11" * 20,
        "api_url": "http://127.0.0.1:1",
        "ray_address": "127.0.0.1:2",
        "ray_node": REF,
        "signer": REF,
        "temp_dir": temp_dir,
        "registration": "0x" + "22" * 32,
        "keystore": "/nonexistent.json",
        "stake_ugpc": 1,
    }


def test_leave_refuses_a_record_that_names_another_dir(tmp_path) -> None:
    victim = tmp_path / "keep"
    victim.mkdir()
    path = joining.record_path(tmp_path, "vol0")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_node_record(str(victim))))
    with pytest.raises(HeadError, match="not a node record"):
        joining.leave(tmp_path, "vol0", None)
    assert victim.is_dir() and path.exists()
    assert joining.read_records(tmp_path) == []  # `leave --all` does not act on it either


def test_down_refuses_a_record_that_names_another_dir(tmp_path) -> None:
    victim = tmp_path / "keep"
    victim.mkdir()
    (tmp_path / lifecycle.INFO_FILE).write_text(
        json.dumps(
            {
                "ray_address": "127.0.0.1:2",
                "api_url": "http://127.0.0.1:1",
                "metrics_url": "http://127.0.0.1:1/metrics",
                "dashboard_url": "http://127.0.0.1:3",
                "token_path": str(tmp_path / "token"),
                "ray_temp_dir": str(victim),
                "ray_head": REF,
                "service": REF,
                "dev": True,
            }
        )
    )
    with pytest.raises(HeadError, match="not a head's record"):
        lifecycle.down(tmp_path)
    assert victim.is_dir()
