"""An installed wheel runs without the checkout: it holds the shipped policies and the ledger's
migrations (before, the CLI read ``policies/`` from the checkout beside the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from pathlib import Path
import gpucoin
from gpucoin.ledger import Ledger
from gpucoin.ledger.migrate import current_revision
from gpucoin.policy.model import resolve_policy, shipped_policy_names

assert Path(gpucoin.__file__).is_relative_to(Path(sys.argv[1])), gpucoin.__file__
print("names", shipped_policy_names())
for name in shipped_policy_names():
    print(name, resolve_policy(name).name)
with Ledger("sqlite:///" + sys.argv[2]) as lg:
    with lg._engine.connect() as conn:
        print("revision", current_revision(conn))
"""


def test_a_built_wheel_has_the_policies_and_migrations(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "gpucoin", src / "gpucoin", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=src,
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("gpucoin-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(site), str(tmp_path / "ledger.db")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "names ['default', 'local']"
    assert "default default" in lines and "local local" in lines
    assert lines[-1].startswith("revision 0") and lines[-1] != "revision None"
