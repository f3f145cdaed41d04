"""The Ray dashboard of a token-auth head, in a real browser: headless Chromium (Debian's `chromium` +
`chromium-driver`, driven by Selenium) is refused without the token, and with the token's cookie
(`ray-authentication-token`, what Ray's HTTP middleware accepts from web sessions) shows a job submitted
through our CLI on the Jobs page and its role-named actors (`<job_name>/<role>/<index>`) on the Actors page.
Skips with a reason only where Chromium, chromedriver or selenium is missing.
"""
from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request

import pytest

from conftest import SHORT_JOB, _wait_status, cli

pytestmark = pytest.mark.cluster   # own Ray head or multi-node Cluster: `pytest -m cluster`

COOKIE = "ray-authentication-token"          # ray/_private/authentication/authentication_constants.py
ROLE_ACTORS = ("learner/0", "generator/0", "generator_pool/0")   # after the job's id: `<job id>/<role>/<index>`


def _browser():
    """A headless Chromium WebDriver, or a skip saying what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        pytest.skip(f"selenium cannot be imported ({error}); pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--disable-extensions"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


def _http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _fetch_status(driver, path: str) -> int:
    """The HTTP status the page's own origin gets for `path` (cookies included, as the dashboard's XHRs)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'}).then(r => done(r.status), e => done(-1));", path)


def _wait_for_texts(driver, texts, timeout_s: float, screenshot, what: str, reload_every_s: float = 20.0) -> None:
    """Wait until every one of `texts` is in the page's text, reloading now and then (the React app renders
    slowly on small machines, and actors appear after the job does); on timeout, a screenshot in the message."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout_s
    reload_at = time.monotonic() + reload_every_s
    body = ""
    while True:
        try:
            body = driver.find_element("tag name", "body").text
        except WebDriverException:
            body = ""
        if all(text in body for text in texts):
            return
        if time.monotonic() > deadline:
            path = screenshot(what)
            missing = [text for text in texts if text not in body]
            raise AssertionError(f"{what}: {missing} not on {driver.current_url} after {timeout_s:g} s; "
                                 f"screenshot {path}; page text: {body[-1500:]!r}")
        if time.monotonic() > reload_at:
            driver.refresh()
            reload_at = time.monotonic() + reload_every_s
        time.sleep(1)


def test_dashboard_shows_the_job_and_its_role_named_actors_only_with_the_token(head, tmp_path):
    address, env, token_file = head
    driver = _browser()                        # skips before any job is submitted when Chromium is missing
    env_with_token = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    token = token_file.read_text().strip()
    job_id = None

    def screenshot(what: str) -> str:
        path = tmp_path / f"{what.replace(' ', '_')}.png"
        driver.save_screenshot(str(path))
        return str(path)

    try:
        submitted = cli(["submit", "configs/quickstart.yaml", "--address", address, *SHORT_JOB,
                         "--set", "steps=100000"], env_with_token)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().splitlines()[-1]

        # Without the token the dashboard's API refuses: 401 with nothing, 403 with a wrong token.
        assert _http_status(f"{address}/api/jobs/") == 401
        assert _http_status(f"{address}/api/jobs/", {"Cookie": f"{COOKIE}={'0' * 64}"}) == 403
        assert _http_status(f"{address}/api/jobs/", {"Cookie": f"{COOKIE}={token}"}) == 200

        driver.set_page_load_timeout(60)
        driver.get(f"{address}/")                  # a first page on this origin, so the cookie can be set for it
        assert _fetch_status(driver, "/api/jobs/") == 401, "the browser reached the jobs API without the token"
        driver.add_cookie({"name": COOKIE, "value": token, "path": "/"})
        driver.refresh()
        assert _fetch_status(driver, "/api/jobs/") == 200, "the token cookie was not accepted"

        _wait_status(job_id, address, env_with_token, {"RUNNING"}, 120)
        driver.get(f"{address}/#/jobs")
        _wait_for_texts(driver, [job_id], 60, screenshot, "jobs page")
        driver.get(f"{address}/#/actors")
        _wait_for_texts(driver, [f"{job_id}/{role}" for role in ROLE_ACTORS], 90, screenshot, "actors page")
    finally:
        driver.quit()
        if job_id is not None:
            stopped = cli(["stop", job_id, "--address", address], env_with_token)
            assert stopped.returncode == 0, stopped.stderr
