"""The Ray Jobs SDK as rl-service's job commands use it (rl_service/driver/jobs.py, rl_service/driver/job_runs.py):
the job server's address and auth token, and every SDK error turned into one line (UserError, exit
code 2) that names the address and the cause, never the token."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from rl_service.config.cluster import is_job_server_url
from rl_service.errors import UserError
from rl_service.driver.preflight import check_job_server_answers

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
UPLOAD_EXCLUDES = [".venv", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"]


def connection(parser) -> None:
    """The job server options of a command that talks to a cluster."""
    parser.add_argument("--address", help=f"Ray job server (dashboard) URL; default RAY_API_SERVER_ADDRESS, "
                                          f"RAY_ADDRESS, then {DEFAULT_ADDRESS}")
    parser.add_argument("--token-file", help="file holding the cluster's Ray auth token (else RAY_AUTH_TOKEN / "
                                             "RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token)")


def address_source(given: str | None) -> str:
    """Where the job server address came from, as messages name it: a user who passed no --address
    was told to fix one."""
    if given:
        return "--address"
    return next((name for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if os.environ.get(name)),
                "the default address")


def server_address(address: str | None) -> str:
    if address is not None and not address.strip():   # `--address "$UNSET"`: not the default's to answer
        raise UserError(f"--address is empty; the job server is an http(s) URL (the dashboard, e.g. {DEFAULT_ADDRESS})")
    named = address_source(address)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not is_job_server_url(address):
        # README has `run` users put a GCS address (HEAD:6379) in RAY_ADDRESS; the job commands need the dashboard's.
        hint = ("; RAY_ADDRESS may name the cluster for `run`: give the job commands --address or "
                "RAY_API_SERVER_ADDRESS" if named == "RAY_ADDRESS" else "")
        raise UserError(f"{named} {address}: the job server is an http(s) URL (the dashboard, e.g. {DEFAULT_ADDRESS}){hint}")
    scheme, _, rest = address.strip().partition("://")
    try:   # a bad port or bracket would come out of the SDK as a traceback
        parts = urlsplit(address.strip())
        parts.port
    except ValueError as error:
        raise UserError(f"{named} {address}: not a valid URL ({error})") from None
    if not parts.hostname:
        raise UserError(f"{named} {address}: no host in the URL (e.g. {DEFAULT_ADDRESS})")
    return f"{scheme.lower()}://{rest}"   # Ray's job client reads "HTTP://" as a module name


# What a job id can be: ours (`<job_name>-<date>-<hex>`), Ray's (`raysubmit_...`, hex job ids). It
# goes into the job server's URL path, where "/" or ".." would name another route.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise UserError(f"job id {job_id!r}: not a job id (letters, digits, '_', '.', ':', '-'); "
                        "`rl-service list` shows the ids")


def use_auth_token(token_file: str | None) -> None:
    """Send the cluster's auth token when there is one: --token-file, else RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, then Ray's default file (~/.ray/auth_token, which `ray start --head` writes
    when it turns token auth on by itself). Token auth is switched on as Ray switches it on (its
    RAY_AUTH_MODE, and the config it has cached if Ray is imported already); a RAY_AUTH_MODE the user
    set is kept."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise UserError(f"--token-file {path}: no such file")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())
        os.environ.pop("RAY_AUTH_TOKEN", None)   # the file named on the command line wins
    if os.environ.get("RAY_AUTH_MODE"):
        return
    # Ray's own helpers: where it looks for the token file, and how it turns token auth on.
    from ray._private.authentication.authentication_token_setup import _enable_token_auth, _get_default_token_path

    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or _get_default_token_path().is_file():
        _enable_token_auth()


def job_server_client(args):
    if getattr(args, "job_id", None) is not None:
        check_job_id(args.job_id)
    address = server_address(args.address)
    use_auth_token(args.token_file)
    import logging

    from ray.job_submission import JobSubmissionClient

    if args.address:
        # Ray's SDK lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given; the
        # one typed on the command line must win (deploy/README.md has users export RAY_ADDRESS).
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ.pop("RAY_ADDRESS", None)
    # Ray's packaging notes (files left out of the upload, packages reused) would bury our one-line
    # results; some of its modules set their own levels, so every Ray logger is quietened.
    for name in [name for name in logging.root.manager.loggerDict if name == "ray" or name.startswith("ray.")]:
        logging.getLogger(name).setLevel(logging.ERROR)

    named = address_source(args.address)
    check_job_server_answers(address, named=named)
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - the SDK raises ConnectionError, RuntimeError, ValueError
        raise UserError(f"{named} {address}: {cause(error)}") from None


# An address in the SDK's message ("Failed to connect to Ray at address: http://127.0.0.1:40371") is
# cut out before looking for a status code: port 40371 had been read as HTTP 403, an auth refusal.
_ADDRESS = re.compile(r"(\w+://)?[\w.\-\[\]]+:\d+\S*")
# A status code only where the SDK or requests states one ("status code 403", "401 Client Error"): a
# job id ending in -403 is not one.
_AUTH_REFUSED = re.compile(r"status code (401|403)\b|\b(401|403) Client Error|unauthori[sz]ed|authenticat|forbidden",
                           re.IGNORECASE)


def cause(error: BaseException) -> str:
    text = " ".join(str(error).split())
    words = _ADDRESS.sub("", text)
    lowered = words.lower()
    if _AUTH_REFUSED.search(words):
        return ("the job server refused the request: missing or wrong Ray auth token (from --token-file, else "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; none is sent under RAY_AUTH_MODE=disabled)")
    if "connect" in lowered or "connection" in lowered:
        return "cannot reach the Ray job server (is the cluster up and the address right?)"
    return text[:300]


def sdk_call(args, action):
    try:
        return action()
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - SDK errors become one line
        text = " ".join(str(error).split())
        # The job server's own words for an unknown id; a 404 for a wrong URL path, or a missing file
        # named in another error, is not "no such job".
        job_id = getattr(args, "job_id", None)
        if job_id is not None and f"Job {job_id} does not exist" in text:
            raise UserError(f"job {job_id}: no such job on {server_address(args.address)}") from None
        raise UserError(f"{server_address(args.address)}: {cause(error)}") from None


def submit_job(args, client, timeout_s: float = 60.0, **job) -> None:
    """`client.submit_job(**job)`, retried while the head answers that its job agent is not up yet
    (for a while after `ray start`: "No available agent to submit job, please try again later")."""
    deadline = time.monotonic() + timeout_s

    def attempt():
        while True:
            try:
                return client.submit_job(**job)
            except Exception as error:  # noqa: BLE001 - only the agent's start-up is retried; sdk_call words the rest
                if "no available agent" not in str(error).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    sdk_call(args, attempt)
