"""What a `ray start --head --node-ip-address 127.0.0.1` listens on (issue #18, finding 9): every
process of a real token-auth head that binds beyond loopback is named in deploy/README.md's
firewall table, and the README says that the metrics port has no token and that `ray stop` stops
every Ray of the user on the host.
"""
from __future__ import annotations

import ipaddress
import re
import time
from pathlib import Path

import pytest

from conftest import start_head

pytestmark = pytest.mark.cluster   # own Ray head: `pytest -m cluster`

README = Path(__file__).resolve().parents[1] / "deploy" / "README.md"


def _component(process) -> str:
    """The README's name for a listening process."""
    name, command = process.name(), " ".join(process.cmdline())
    for needle, component in (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("DashboardAgent", "dashboard agent"),
                              ("RuntimeEnvAgent", "runtime env agent"), ("ray.util.client.server", "ray client server"),
                              ("monitor.py", "monitor.py"), ("dashboard.py", "dashboard")):
        if needle in name or needle in command:
            return component
    return f"{name} ({command[:80]})"


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listeners(root_pid: int) -> set[tuple[str, str]]:
    import psutil

    root = psutil.Process(root_pid)
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((_component(process), connection.laddr.ip))
        except psutil.Error:
            pass   # a process that ended while we looked
    return found


# Every process of a head that listens (deploy/README.md's table, workers aside).
HEAD_COMPONENTS = frozenset({"gcs_server", "raylet", "dashboard agent", "runtime env agent", "ray client server",
                             "dashboard", "monitor.py"})


def _head_listeners(env_changes: dict, timeout_s: float = 180.0) -> set[tuple[str, str]]:
    """Every (component, address) the head's processes listen on: collected until each component of
    HEAD_COMPONENTS listens and nothing new has bound for 5 s (and 10 s at least), not after a fixed
    sleep: the agents and the autoscaler monitor bind some seconds after the head answers, more on a
    loaded machine."""
    import psutil

    # No --metrics-export-port: the agent binds a port of its own choosing (a free port picked here
    # could be taken before it bound it, on every retry of start_head alike), on the same interfaces.
    with start_head((), env_changes) as (_, _, token_file):
        head = next(process for process in psutil.process_iter(["cmdline"])
                    if str(token_file.parent / "ray") in " ".join(process.info["cmdline"] or [])
                    and "--block" in (process.info["cmdline"] or []))
        started = last_new = time.monotonic()
        found: set[tuple[str, str]] = set()
        while True:
            now = time.monotonic()
            seen = _listeners(head.pid)
            if not seen <= found:
                found |= seen
                last_new = now
            if now > started + timeout_s or (HEAD_COMPONENTS <= {component for component, _ in found}
                                             and now >= started + 10 and now >= last_new + 5):
                return found
            time.sleep(0.5)


def _firewall_section() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## What listens where"):]
    return section[:section.index("\n## ", 3)]


def test_everything_a_head_binds_beyond_loopback_is_in_the_firewall_table():
    pytest.importorskip("psutil")
    # As a user types it: `ray start --head --node-ip-address 127.0.0.1`, nothing else set.
    listeners = _head_listeners({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None})
    exposed = {component for component, address in listeners if not _loopback(address)}
    section = _firewall_section()
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| [^|]+\| ([^|]+) \|", section, flags=re.M)
    assert exposed <= {process for process, _ in rows}, \
        f"listening beyond loopback but not in deploy/README.md: {sorted(exposed - {process for process, _ in rows})}"
    # What the table says binds to all interfaces does (the GCS, the raylet, the agent's metrics port).
    assert {process for process, binds in rows if binds.startswith("all interfaces")} <= exposed | {"monitor.py"}, listeners
    assert "**no**" in section and "metrics-export-port" in section          # the token-less metrics port
    assert "`ray stop` stops every Ray process **of your user on the host**" in section


def test_a_one_machine_head_stays_on_loopback_as_the_readme_says():
    pytest.importorskip("psutil")
    section = _firewall_section()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address 127.0.0.1" in section
    listeners = _head_listeners({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert any(component == "gcs_server" for component, _ in listeners), listeners
    assert all(_loopback(address) for _, address in listeners), sorted(listeners)
