"""A throwaway PostgreSQL server for the tests: its own cluster in a temporary directory, on a local socket.

Needs the server binaries (``initdb``, ``pg_ctl``; Debian's ``postgresql`` package, which ``.ci/run``
installs) and the ``psycopg2`` driver (the ``postgres`` extra). Without them the tests that use it skip with
the reason -- unless ``BITPLAN_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), where a missing server is a failure.
``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["postgres_server"]


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Unavailable(RuntimeError):
    pass


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of an empty database ``bitplan`` on a fresh server; stop and remove it after."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql (.ci/run does)")
    try:
        import psycopg2
    except ImportError:
        raise Unavailable("the psycopg2 driver is not installed (pip install -e '.[postgres]')") from None
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="bitplan-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise Unavailable("running as root without runuser: cannot start PostgreSQL as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, sock, port = root / "data", root, _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        opts = f"-c listen_addresses='' -c unix_socket_directories={sock} -p {port} -c fsync=off -c max_connections=50"
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        detail = getattr(e, "stderr", b"") or b""
        raise Unavailable(f"could not start PostgreSQL: {e}: {detail.decode(errors='replace').strip()[-300:]}") from None
    try:
        conn = psycopg2.connect(host=str(sock), port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE bitplan")
        conn.close()
        yield f"postgresql+psycopg2://postgres@/bitplan?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
