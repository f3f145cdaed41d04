"""The job commands' side of rl_service/driver/job_client.py, no head needed (tests/test_cluster_jobs.py
talks to a real one): which Ray auth token they send (read back from Ray's own header logic in a
fresh process), how SDK errors are worded, and the addresses and job ids refused before any request."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import unreachable_url

REPO = Path(__file__).resolve().parents[1]
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def sent_header(home: Path, env: dict[str, str] | None = None, token_file: Path | None = None,
                ray_first: bool = False) -> str | None:
    """The Authorization header Ray's job SDK would send after use_auth_token, HOME being `home`.
    `ray_first`: Ray (its cached config) imported before, as by a command that loaded it already."""
    code = ("import sys\n"
            + ("import ray._raylet\n" if ray_first else "")
            + "from rl_service.driver.job_client import use_auth_token\n"
              "use_auth_token(sys.argv[1] or None)\n"
              "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled\n"
              "print(get_auth_headers_if_auth_enabled({}).get('authorization'))\n")
    environment = {key: value for key, value in os.environ.items() if key not in AUTH_VARIABLES}
    environment.update(HOME=str(home), **(env or {}))
    out = subprocess.run([sys.executable, "-c", code, str(token_file or "")], cwd=REPO, env=environment,
                         capture_output=True, text=True, check=True, timeout=120).stdout.strip().splitlines()[-1]
    return None if out == "None" else out


def test_the_default_token_file_is_sent_when_nothing_else_names_one(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-token")
    # As `ray start --head` leaves it: token auth on by itself, no RAY_AUTH_* variable in the shell.
    assert sent_header(tmp_path) == "Bearer default-token"
    assert sent_header(tmp_path, ray_first=True) == "Bearer default-token"
    # --token-file, then the variables, come before the default file; RAY_AUTH_MODE=disabled sends none.
    named = tmp_path / "named"
    named.write_text("named-token")
    assert sent_header(tmp_path, {"RAY_AUTH_TOKEN": "variable-token"}, token_file=named) == "Bearer named-token"
    assert sent_header(tmp_path, {"RAY_AUTH_TOKEN": "variable-token"}) == "Bearer variable-token"
    assert sent_header(tmp_path, {"RAY_AUTH_MODE": "disabled"}) is None


def test_no_token_anywhere_sends_none(tmp_path):
    assert sent_header(tmp_path) is None


def test_the_refusal_names_every_token_source():
    from rl_service.driver.job_client import cause

    message = cause(RuntimeError("Authentication required: 401 Unauthorized"))
    for source in ("--token-file", "RAY_AUTH_TOKEN,", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token", "RAY_AUTH_MODE"):
        assert source in message, source


@pytest.mark.parametrize("message", [
    "Failed to connect to Ray at address: http://127.0.0.1:40371.",
    "Connection aborted while reading job quickstart-20261207-155601-403 (RemoteDisconnected)",   # an id
    "HTTPConnectionPool(host='127.0.0.1', port=40137): Max retries exceeded (Caused by NewConnectionError("
    "'Failed to establish a new connection: [Errno 111] Connection refused'))",
])
def test_a_number_in_an_address_is_not_read_as_a_status_code(message):
    # Port 40371 holds "403": a dead address was reported as an auth refusal (seen in CI).
    from rl_service.driver.job_client import cause

    assert cause(ConnectionError(message)).startswith("cannot reach the Ray job server")


@pytest.mark.parametrize("message", ["Request failed with status code 403: Forbidden",
                                     "401 Client Error: Unauthorized for url: http://127.0.0.1:8265/api/jobs/"])
def test_a_refusal_by_status_code_is_still_an_auth_refusal(message):
    from rl_service.driver.job_client import cause

    assert cause(RuntimeError(message)).startswith("the job server refused the request")


@pytest.mark.parametrize("message, no_such_job", [
    ("Request failed with status code 404: Job raysubmit_x does not exist.", True),
    ("Request failed with status code 404: 404: Not Found.", False),   # a wrong URL path, not the job
    ("[Errno 2] No such file or directory: '/tmp/x': does not exist", False),
])
def test_only_the_job_server_s_own_words_mean_no_such_job(message, no_such_job):
    from types import SimpleNamespace

    from rl_service.driver.job_client import sdk_call
    from rl_service.errors import UserError

    def failing():
        raise RuntimeError(message)

    with pytest.raises(UserError) as said:
        sdk_call(SimpleNamespace(job_id="raysubmit_x", address="http://127.0.0.1:8265"), failing)
    assert ("no such job" in str(said.value)) == no_such_job, str(said.value)


@pytest.mark.parametrize("address, named", [
    ("", "--address is empty"),                            # `--address "$UNSET"`, not the default address
    ("http://127.0.0.1:abc", "not a valid URL"),           # the SDK raised http.client.InvalidURL
    ("http://[::1", "not a valid URL"),                    # ... and ValueError: Invalid IPv6 URL
    ("http://:8265", "no host in the URL"),
])
def test_a_malformed_address_is_one_line_before_any_request(address, named):
    result = subprocess.run([sys.executable, "-m", "rl_service.cli", "status", "some-job", "--address", address],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("environment, expected", [
    ({"RAY_ADDRESS": "127.0.0.1:6379"}, "RAY_ADDRESS 127.0.0.1:6379: the job server is an http(s) URL (the dashboard, "
                                        "e.g. http://127.0.0.1:8265); RAY_ADDRESS may name the cluster for `run`"),
    ({"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}, "RAY_API_SERVER_ADDRESS http://127.0.0.1:1: cannot reach"),
    ({}, "the default address http://127.0.0.1:8265: cannot reach"),
])
def test_an_address_the_user_did_not_type_is_named_by_where_it_came_from(environment, expected):
    # Each of these said "--address ...", a flag the user never passed. (Nothing listens on port 1; the
    # default 8265 may have a dashboard on a developer's machine, so only its naming is asserted.)
    env = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    result = subprocess.run([sys.executable, "-m", "rl_service.cli", "status", "some-job"], cwd=REPO,
                            env={**env, **environment}, capture_output=True, text=True, timeout=120)
    if environment or "cannot reach" in result.stderr:
        assert result.returncode == 2 and result.stderr.startswith(f"rl-service: error: {expected}"), result.stderr


@pytest.mark.parametrize("job_id", ["../../api/version", "a;rm -rf /", "a/b", "", "-x", "a..b"])
def test_a_job_id_that_would_name_another_route_is_refused(job_id):
    from rl_service.driver.job_client import check_job_id
    from rl_service.errors import UserError

    with pytest.raises(UserError, match="not a job id"):
        check_job_id(job_id)


@pytest.mark.parametrize("job_id", ["quickstart-20261207-155601-a1b2c3", "raysubmit_XYZ12ab", "02000000"])
def test_real_job_ids_pass(job_id):
    from rl_service.driver.job_client import check_job_id

    check_job_id(job_id)


def test_status_of_a_path_like_job_id_is_refused_before_any_request():
    with unreachable_url() as nowhere:
        result = subprocess.run([sys.executable, "-m", "rl_service.cli", "logs", "../../etc/passwd",
                                 "--address", nowhere], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a job id" in result.stderr and "cannot reach" not in result.stderr, result.stderr
