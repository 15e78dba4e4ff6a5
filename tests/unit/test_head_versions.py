"""A node refuses a head whose versions differ from its own, naming both (pure)."""

import pytest

from gpucoin.exceptions import HeadError
from gpucoin.head.versions import check_same, versions


def test_the_same_versions_pass() -> None:
    check_same(versions(), versions())


def test_every_difference_is_named_with_both_versions() -> None:
    here = versions()
    head = here.model_copy(update={"ray": "2.59.0", "torch": "2.12.0"})
    with pytest.raises(HeadError) as info:
        check_same(head, here)
    text = str(info.value)
    assert f"ray 2.59.0 on the head, {here.ray} here" in text
    assert f"torch 2.12.0 on the head, {here.torch} here" in text
    assert "python" not in text and "deepspeed" not in text


def test_versions_are_read_without_importing_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from gpucoin.head.versions import versions; v = versions(); print('torch' in sys.modules, v.torch)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out[0] == "False" and out[1][0].isdigit()
