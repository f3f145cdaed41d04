"""`cluster` and `schedule`: where a run executes (a local Ray or a cluster to join) and how its
steps overlap."""
from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator

from rl_service.config.section import _Section


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address to join; null: RAY_ADDRESS or a local Ray on 127.0.0.1")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs declared to a local Ray (null: the machine's)")
    include_dashboard: bool = Field(False, description="start the Ray dashboard with a local Ray (about +1 GB)")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch threads per actor (null: all cores; sync mode runs one role at a time)")
    max_role_failures: int = Field(
        3, ge=0, le=1000, description="role deaths (generator, statistics, learner; Ray itself restarts a dead reward actor, "
                                      "up to 3 times, and retries its call) a run recovers from by "
                                      "restarting every role from the newest checkpoint; 0 = fail at the first")

    @field_validator("address")
    @classmethod
    def _not_a_job_server(cls, address: str | None) -> str | None:
        if address and is_job_server_url(address):
            raise ValueError(f"{address} is a Ray job server (dashboard) URL, for `rl-service submit --address`; a run "
                             "joins a cluster by its GCS address (host:6379) or ray://host:10001")
        if address and address not in ("auto", "local") and (not _RAY_ADDRESS.fullmatch(address.strip())
                                                             or int(address.strip().rsplit(":", 1)[1]) > 65535):
            raise ValueError(f"{address!r} is not a Ray address: host:port (the GCS, e.g. 10.0.0.1:6379), "
                             "ray://host:port (Ray Client), auto (the cluster this machine is part of) or local")
        return address

    def address_to_join(self) -> str | None:
        """The Ray cluster a run joins: `address`, else RAY_ADDRESS (Ray's job supervisor sets it for a
        submitted job's driver), else None: a local Ray. A RAY_ADDRESS that is a job server URL
        (deploy/README.md has users export http://HEAD:8265 for the job commands) names no cluster a
        driver can join, so a run on that shell is a local one (rl_service/driver/roles.py says so once)."""
        address = self.address or os.environ.get("RAY_ADDRESS")
        # "local" is Ray's word for a new local Ray: ours, bound to 127.0.0.1, not a cluster to join.
        return None if not address or address == "local" or is_job_server_url(address) else address


_RAY_ADDRESS = re.compile(r"(ray://)?([\w.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")


def is_job_server_url(address: str) -> bool:
    """An http(s) URL: a Ray job server (the dashboard), not a GCS address a run can join."""
    return address.strip().lower().startswith(("http://", "https://"))


class ScheduleConfig(_Section):
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: generate, then train, then publish, one step at a time; async: generation of the next "
                            "steps overlaps training on this one (DESIGN.md 'One training step')")
    max_staleness: int = Field(
        1, ge=0, le=64, description="async: most weight versions a trained sample may lag the learner; 0 = no overlap "
                                    "(equals sync exactly)")
