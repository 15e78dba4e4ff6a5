"""The Ray token of a cluster gpucoin starts, and this process's Ray environment while it uses it.

Every cluster gpucoin starts runs with Ray's token authentication (``RAY_AUTH_MODE=token``,
https://docs.ray.io/en/latest/ray-security/token-auth.html) and gpucoin's own token file
(``RAY_AUTH_TOKEN_PATH``, mode 0600), never the user's ``~/.ray/auth_token`` or a
``RAY_AUTH_TOKEN`` in the environment, and its own Ray temp dir, never ``/tmp/ray``: whatever Ray
state the user has neither breaks the run nor is changed by it. The token's value is never
printed or logged.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from gpucoin.exceptions import ClusterError

TOKEN_BYTES = 32
"""Random bytes in a new token (64 hex characters)."""

RAY_ENV_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")
"""The environment variables through which Ray finds its token and temp dir."""


def ensure_token(path: Path) -> Path:
    """Return ``path``, a 0600 token file owned by this user, writing a fresh token if needed.

    A file that is missing, empty, readable by others or owned by someone else is replaced by a
    new random token (such a token may have leaked; nothing but gpucoin's own clusters uses it).

    Raises:
        ClusterError: if the file cannot be written.
    """
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077 and st.st_size > 0:
            return path
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ClusterError(f"cannot use the Ray token file {path}: {e.strerror}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(TOKEN_BYTES))
    except OSError as e:
        raise ClusterError(f"cannot write the Ray token file {path}: {e.strerror}") from None
    return path


def ray_env(token_path: Path, temp_dir: Path) -> dict[str, str]:
    """The variables every process of the cluster (nodes and driver) runs with.

    ``RAY_AUTH_TOKEN`` is absent on purpose: Ray prefers it over the file, so callers remove it.
    """
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_TMPDIR": str(temp_dir)}


def node_env(base: dict[str, str], token_path: Path, temp_dir: Path) -> dict[str, str]:
    """``base`` with the cluster's Ray variables set and a user's ``RAY_AUTH_TOKEN`` removed."""
    env = {k: v for k, v in base.items() if k != "RAY_AUTH_TOKEN"}
    env.update(ray_env(token_path, temp_dir))
    return env


def _reset_ray_auth_cache() -> None:
    # Ray caches the auth mode (RayConfig) and the token (C++ loader) per process: refresh both
    # after changing the environment, config first (ray._private.authentication_test_utils).
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def driver_env(token_path: Path, temp_dir: Path):
    """Within the block this process connects to the cluster as its driver, then its env is restored."""
    saved = {k: os.environ.get(k) for k in RAY_ENV_KEYS}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(ray_env(token_path, temp_dir))
    _reset_ray_auth_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reset_ray_auth_cache()


def home_token_path(home: Path) -> Path:
    """Where gpucoin keeps the Ray token of the clusters it starts for state directory ``home``."""
    return Path(home) / "ray" / "auth_token"
