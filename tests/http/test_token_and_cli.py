"""``--token``, where ``kvlog serve`` listens by default, and what it says without the server extra."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from http_helpers import PATIENCE, Served, clean_env, error_of, kvlog, target_args

TOKEN = "s3cret-token"

GUARDED = [
    ("GET", "/v1/keys/k"),
    ("GET", "/v1/keys/k?raw"),
    ("PUT", "/v1/keys/k"),
    ("DELETE", "/v1/keys/k"),
    ("POST", "/v1/batch"),
    ("GET", "/v1/scan"),
    ("GET", "/v1/stats"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "data"
    kvlog(target_args(path), "put", "k", '"secret value"')
    return path


@pytest.fixture(scope="module")
def server(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(target_args(data), "--writable", log_dir=tmp_path_factory.mktemp("logs"), token=TOKEN) as s:
        yield s


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer"],
    ids=["none", "wrong", "longer", "basic", "empty"],
)
def test_every_route_but_the_probes_needs_the_token(
    server: Served, data: Path, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    body = {"k": "changed"} if path == "/v1/batch" else "changed" if method == "PUT" else None
    response = httpx.request(method, server.url + path, headers=headers, json=body, timeout=PATIENCE)
    error_of(response, 401, "token" if authorization else "Authorization: Bearer")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "secret value" not in response.text
    if method != "GET":  # nothing written: another process reads the value as it was
        assert kvlog(target_args(data), "get", "k").stdout.strip() == '"secret value"'


def test_with_the_token_every_route_answers(server: Served) -> None:
    assert server.client.get("/v1/keys/k").json() == "secret value"
    assert server.client.get("/v1/stats").status_code == 200
    assert server.client.get("/metrics").status_code == 200
    assert server.client.get("/v1/scan").status_code == 200
    assert server.client.put("/v1/keys/t", json=1).status_code == 200
    assert server.client.delete("/v1/keys/t").status_code == 200


def test_the_probes_and_the_console_files_answer_without_the_token(server: Served) -> None:
    """Probes for the orchestrator; the console's files hold no data (the page asks for the token)."""
    for path in ("/healthz", "/readyz", "/", "/console.js", "/console.css"):
        response = httpx.get(server.url + path, timeout=PATIENCE)
        assert response.status_code == 200, path
        assert "secret value" not in response.text


def test_serve_listens_on_loopback_by_default_and_warns_on_another_host_without_a_token(
    data: Path, tmp_path: Path
) -> None:
    with Served(target_args(data), log_dir=tmp_path) as served:
        assert served.url.startswith("http://127.0.0.1:")
    with Served(target_args(data), "--host", "0.0.0.0", log_dir=tmp_path) as served:
        assert served.url.startswith("http://0.0.0.0:")
        assert "without --token" in served.stderr()
    with Served(target_args(data), "--host", "0.0.0.0", log_dir=tmp_path, token=TOKEN) as served:
        assert "warning" not in served.stderr()


def test_serve_without_the_server_extra_says_which_pip_command_installs_it(tmp_path: Path) -> None:
    # uvicorn made unimportable in this interpreter, as when the extra is not installed.
    program = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from kvlog.cli import main\n"
        f"sys.exit(main(['--data', {str(tmp_path / 'data')!r}, 'serve']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=PATIENCE, env=clean_env()
    )
    assert done.returncode == 2, done
    assert "pip install 'kvlog[server]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()
