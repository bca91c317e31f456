"""The tracking server preset is locked down against other local users (issue 10, item 12).

Before: ``pg_hba.conf`` said ``trust`` for the socket, 127.0.0.1 and ::1 (replication included), so any local user
connected as the superuser and could run shell commands as ``postgres`` (``COPY ... TO PROGRAM``); the MLflow REST
API answered anyone. Now PostgreSQL asks every connection for a scram-sha-256 password, mlflow server connects as a
role that is no superuser, and MLflow's basic-auth app asks for the generated admin credentials. The secrets are
0600 files and appear on no command line.

The server is the real ``scripts/tracking_server.sh`` (the ``tracking_server`` fixture in conftest.py).
"""

from __future__ import annotations

import base64
import os
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SECRET_FILES = {"pg-superuser.password", "pg-superuser.pgpass", "pg-featstudy.password", "pg-featstudy.pgpass",
                "mlflow-admin.env", "mlflow-auth.ini", "mlflow-auth.db", "mlflow-flask-secret-key"}


@pytest.fixture
def no_pg_env(monkeypatch):
    """No password reaches libpq except the one a test passes: no PGPASSWORD, no ~/.pgpass."""
    for key in ("PGPASSWORD", "PGUSER", "PGHOST", "PGSERVICE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)


def _secret(server, name: str) -> str:
    return (server.folder / "secrets" / name).read_text().strip()


def _connect(server, host, user, password=None, dbname="postgres", **kw):
    import psycopg

    args = dict(host=str(host), port=server.pgport, user=user, dbname=dbname, connect_timeout=10, **kw)
    if password is not None:
        args["password"] = password
    return psycopg.connect(**args, autocommit=True)


def test_secret_files_are_private_and_on_no_command_line(tracking_server):
    secrets = tracking_server.folder / "secrets"
    st = secrets.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert SECRET_FILES <= {p.name for p in secrets.iterdir()}
    for p in secrets.iterdir():
        st = p.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid(), p
    values = [_secret(tracking_server, n) for n in ("pg-superuser.password", "pg-featstudy.password",
                                                    "mlflow-flask-secret-key")]
    values.append(tracking_server.credentials["MLFLOW_TRACKING_PASSWORD"])
    assert all(len(v) >= 32 for v in values) and len(set(values)) == 4
    # every local user can read every process's command line (ps): no secret may be there
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert not any(v in cmdline for v in values), f"a secret on the command line of pid {proc.name}"


@pytest.mark.parametrize("where", ["tcp", "socket"])
@pytest.mark.parametrize("user", ["postgres", "featstudy"])
def test_postgres_refuses_connections_without_the_password(tracking_server, no_pg_env, where, user):
    import psycopg

    host = "127.0.0.1" if where == "tcp" else tracking_server.folder / "pgdata"  # the socket's folder (-k)
    with pytest.raises(psycopg.OperationalError, match=r"no password supplied"):
        _connect(tracking_server, host, user)
    with pytest.raises(psycopg.OperationalError, match=r"password authentication failed"):
        _connect(tracking_server, host, user, password="not-the-secret")
    password = _secret(tracking_server, f"pg-{'superuser' if user == 'postgres' else user}.password")
    with _connect(tracking_server, host, user, password=password, dbname="mlflow") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


def test_pg_hba_has_only_password_lines_and_no_replication(tracking_server, no_pg_env):
    import psycopg

    su = _secret(tracking_server, "pg-superuser.password")
    with _connect(tracking_server, "127.0.0.1", "postgres", password=su) as conn:
        rules = conn.execute("SELECT type, database, auth_method, error FROM pg_hba_file_rules").fetchall()
    assert rules and all(method == "scram-sha-256" and error is None for _, _, method, error in rules), rules
    assert not any("replication" in database for _, database, _, _ in rules)
    assert {t for t, *_ in rules} == {"local", "host"}
    # a physical replication connection is refused even with the superuser's password: no line admits it
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba.conf entry for replication connection"):
        _connect(tracking_server, "127.0.0.1", "postgres", password=su, replication="true")


def test_the_mlflow_role_owns_its_database_and_is_no_superuser(tracking_server, no_pg_env):
    import psycopg

    with _connect(tracking_server, "127.0.0.1", "featstudy", dbname="mlflow",
                  password=_secret(tracking_server, "pg-featstudy.password")) as conn:
        flags = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                             "FROM pg_roles WHERE rolname = current_user").fetchone()
        assert flags == (False, False, False, False, False)
        owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'").fetchone()
        assert owner == ("featstudy",)
        # mlflow server's tables are there, made by this role (it is what mlflow server connects as)
        tables = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public' "
                              "AND tablename IN ('experiments', 'runs', 'metrics')").fetchall()
        assert tables == [("featstudy",)] * 3
        folder = Path(tempfile.mkdtemp(prefix="featstudy-copy-"))
        folder.chmod(0o777)  # writable by 'postgres', should the command run
        marker = folder / "ran"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"COPY (SELECT 1) TO PROGRAM 'cat > {marker}'")
    assert not marker.exists()
    # the same statement as the superuser (with its password) does run: the refusal above is the role's privilege
    with _connect(tracking_server, "127.0.0.1", "postgres", password=_secret(tracking_server, "pg-superuser.password")) as conn:
        conn.execute(f"COPY (SELECT 1) TO PROGRAM 'cat > {marker}'")
    assert marker.read_text() == "1\n"  # the program ran, as 'postgres'
    marker.unlink()
    folder.rmdir()


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_rest_api_needs_the_credentials(tracking_server, monkeypatch):
    url = f"{tracking_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    user = tracking_server.credentials["MLFLOW_TRACKING_USERNAME"]
    password = tracking_server.credentials["MLFLOW_TRACKING_PASSWORD"]
    assert _get(url) == 401
    assert _get(url, user, "not-the-password") == 401
    assert _get(url, "someone", password) == 401
    assert _get(url, user, password) == 200
    assert _get(f"{tracking_server.uri}/health") == 200  # the liveness probe stays open
    # a client passes them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match=r"401|[Uu]nauthori[sz]ed|credentials"):
        MlflowClient(tracking_uri=tracking_server.uri).search_experiments(max_results=1)
    for key, value in tracking_server.credentials.items():
        monkeypatch.setenv(key, value)
    assert isinstance(MlflowClient(tracking_uri=tracking_server.uri).search_experiments(max_results=1), list)
