"""Fixtures for the tests that need the loopback services: PostgreSQL, MariaDB/MySQL and an MLflow server.

Each server is found by URL from an environment variable (defaults: the project's CI machines) and its
tests are skipped, with the reason, when none answers. Nothing is mocked: every test gets its own database
(``CREATE DATABASE``), dropped afterwards; the MLflow server is a real ``mlflow server`` subprocess backed
by PostgreSQL, started once per session on a free port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("WUS_TUNE_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("WUS_TUNE_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.fixture
def study_dir(tmp_path, monkeypatch):
    """tmp_path as the working directory, with MLflow isolated from the user's environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")
    return tmp_path


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine (runs ~50x faster there)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m wus_tune...`` subprocess: this checkout, one torch thread (the
    machine has 2 cores and several workers), quiet MLflow."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_LOGGING_LEVEL="WARNING",
               PYTHONUNBUFFERED="1")  # fmt: skip
    env.update(extra)
    return env


def _engine(url: str):
    import sqlalchemy

    from wus_tune._study.storage import database_url

    return sqlalchemy.create_engine(database_url(url), connect_args={"connect_timeout": 3}, isolation_level="AUTOCOMMIT")


def _unreachable(url: str) -> str | None:
    """None if a server answers at ``url``, else why not (one line)."""
    from wus_tune._study.storage import first_line, mask_url

    try:
        engine = _engine(url)
        try:
            with engine.connect():
                return None
        finally:
            engine.dispose()
    except Exception as e:
        return f"{mask_url(url)}: {first_line(e)}"


def with_database(url: str, name: str) -> str:
    import sqlalchemy

    return sqlalchemy.make_url(url).set(database=name).render_as_string(hide_password=False)


def _database(server_url: str, prefix: str):
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = _engine(server_url)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    return name, engine


@pytest.fixture(scope="session")
def postgres_server() -> str:
    why = _unreachable(POSTGRES_URL)
    if why:
        pytest.skip(f"no PostgreSQL server answers ({why}); set WUS_TUNE_POSTGRES_URL")
    return POSTGRES_URL


@pytest.fixture
def postgres_db(postgres_server: str):
    """A fresh PostgreSQL database (its URL), dropped afterwards."""
    yield from _fresh_database(postgres_server, drop_options=" WITH (FORCE)")


@pytest.fixture
def mysql_db():
    why = _unreachable(MYSQL_URL)
    if why:
        pytest.skip(f"no MySQL/MariaDB server answers ({why}); set WUS_TUNE_MYSQL_URL")
    yield from _fresh_database(MYSQL_URL)


def _fresh_database(server_url: str, drop_options: str = ""):
    """Create a database on the server, yield its URL, drop it afterwards."""
    name, engine = _database(server_url, "wus_tune")
    try:
        yield with_database(server_url, name)
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{drop_options}")
        engine.dispose()


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it spawned (``mlflow server``
    runs uvicorn and job consumers as children)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(0.5)  # the children exit after the group leader
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


@pytest.fixture(scope="session")
def mlflow_server(postgres_server: str, tmp_path_factory: pytest.TempPathFactory):
    """``mlflow server`` on a free loopback port, backed by its own PostgreSQL database; its URL."""
    name, engine = _database(postgres_server, "wus_tune_mlflow")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    from wus_tune._study.storage import database_url

    backend = database_url(with_database(postgres_server, name))
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=worker_env(), cwd=root, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 120, proc)
        yield url
    finally:
        stop_process_group(proc)
        log.close()
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        engine.dispose()


class TcpProxy:
    """A loopback TCP forwarder to a real server, which a test can cut (``stop``) to make the server
    unreachable mid-study without touching the server itself."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped = True
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
