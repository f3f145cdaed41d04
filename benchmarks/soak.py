"""Soak test (issue 9): does any process of the quickstart job grow its memory as training goes on?

    .venv/bin/python benchmarks/soak.py [--steps 500] [--interval 2] [--set k=v ...]

Runs the quickstart job (built-in model, local Ray) and, from a background thread, samples every few
seconds the RSS of the driver, of each Ray actor process grouped by role (`ray::LearnerActor.train` ->
LearnerActor), and of Ray's own processes (raylet, gcs_server, agents, idle workers) as one separate
group; only the driver's descendants count, so other Ray jobs on the machine do not. Samples are mapped
to training steps through the run's metrics.jsonl; those after the last step, and those of an attempt
ended by a role's death (the run recovers from its checkpoint with new processes), are dropped.
Prints each role's RSS at steps 100, 200, ... (every 20% of the run for runs under 500 steps) and its
growth per 100 steps: the least-squares slope of RSS vs step over the second half of the run (the first
half holds warm-up and allocator growth), in % of the role's RSS at the start of that half. The last
line is one JSON object; its `max_rss_growth_pct_per_100_steps` is the max over the driver and the
actor roles (Ray's own group is reported apart, as `ray_rss_growth_pct_per_100_steps`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402

DRIVER, RAY = "driver", "ray (raylet, gcs, ...)"
RAY_TITLES = {"IDLE", "DashboardAgent", "RuntimeEnvAgent"}   # ray:: titles of Ray's own workers and agents
MIB = 1024 * 1024


def role_of(process: psutil.Process) -> str | None:
    """`ray::GeneratorActor.generate` and `ray::quickstart/generator/0:GeneratorActor.__init__` ->
    GeneratorActor; None for a process with no actor title."""
    try:
        title = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if not title.startswith("ray::"):
        return None
    role = title[len("ray::"):].split(" ")[0].rsplit(":", 1)[-1].split(".")[0]
    return None if role in RAY_TITLES else role


def sample_rss(driver: psutil.Process, roles: dict[int, str]) -> tuple[dict[str, float], int | None]:
    """(RSS in MiB per group, raylet pid) over the driver and its descendants only: another Ray job on
    the same machine must not count. `roles` (pid -> role) persists across samples, so an actor stays
    in its role while its title is briefly generic. A process without a role (e.g. a subprocess an
    actor spawns) counts to its nearest ancestor with one; one under none of them is Ray's own. The
    raylet's pid tells attempts apart: a run that recovers from a dead role restarts Ray."""
    rss, raylet, descendants = defaultdict(float), None, driver.children(recursive=True)
    roles[driver.pid] = DRIVER
    for process in descendants:
        role = role_of(process)
        if role is not None:
            roles[process.pid] = role
    for process in [driver, *descendants]:
        try:
            group, ancestor = roles.get(process.pid), process
            while group is None and ancestor is not None and ancestor.pid != driver.pid:
                ancestor = ancestor.parent()
                group = roles.get(ancestor.pid) if ancestor is not None else None
            if group is None or (group == DRIVER and process.pid != driver.pid):
                group = RAY     # started by the driver but not an actor: raylet, gcs_server, agents
                raylet = process.pid if process.name() == "raylet" else raylet
            rss[group] += process.memory_info().rss / MIB
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue            # processes come and go (idle workers, shutdown)
    return dict(rss), raylet


class Sampler(threading.Thread):
    """(last finished train step, raylet pid, RSS per group) every `interval` s while the job runs."""

    def __init__(self, metrics_path: Path, interval: float):
        super().__init__(daemon=True)
        self.metrics_path, self.interval = metrics_path, interval
        self.samples: list[tuple[int, int | None, dict[str, float]]] = []
        self.stop = threading.Event()

    def last_step(self) -> int:
        # The whole file every time: a recovered run rewrites it back to its checkpoint's step.
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        step = 0
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue        # the line being written
            if "step_seconds" in row:
                step = max(step, int(row["step"]))
        return step

    def run(self) -> None:
        driver, roles = psutil.Process(os.getpid()), {}
        while not self.stop.is_set():
            step = self.last_step()     # before RSS: the memory seen is at least that step's
            rss, raylet = sample_rss(driver, roles)
            self.samples.append((step, raylet, rss))
            self.stop.wait(self.interval)


def marks(steps: int) -> list[int]:
    if steps >= 500:
        return list(range(100, steps + 1, 100))
    return sorted({max(1, round(steps * k / 5)) for k in range(1, 6)})


def growth(points: list[tuple[int, float]], half: int) -> tuple[float, float, float]:
    """(RSS at the start of the second half, RSS at the end, slope in % of the former per 100 steps)."""
    second = [(step, rss) for step, rss in points if step >= half] or points[-1:]
    start, end = second[0][1], second[-1][1]
    steps = np.array([step for step, _ in second], dtype=float)
    if len(second) < 2 or np.ptp(steps) == 0:
        return start, end, 0.0
    slope = np.polyfit(steps, [rss for _, rss in second], 1)[0]
    return start, end, 100.0 * slope * 100.0 / start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from rl_service.config import load_config
    from rl_service.driver import prepare_job, run_training

    overrides = [f"steps={args.steps}", "eval_every=50", "data.eval_limit=64", "logging.progress_bar=false",
                 "logging.tensorboard=false", "checkpoint.every=100", "checkpoint.keep_last=2", *args.overrides]
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        sampler = Sampler(Path(run_dir) / "metrics.jsonl", args.interval)
        sampler.start()
        try:
            summary = run_training(prepare_job(config), run_dir)
        finally:
            sampler.stop.set()
            sampler.join()
    steps = summary["steps"]
    # Only samples taken while a train step ran: after the last one the generator idles (it read a few
    # hundred MiB lower once) and Ray shuts down, and such a point at the end would tilt the slope.
    # After a role died and the run recovered, only the last attempt's processes: the others are gone.
    during = [sample for sample in sampler.samples if sample[0] < steps and sample[1] is not None]
    attempts = list(dict.fromkeys(raylet for _, raylet, _ in during)) or [None]
    samples = [(step, rss) for step, raylet, rss in during if raylet == attempts[-1]]
    series = defaultdict(list)      # group -> [(step, RSS MiB)]
    for step, rss in samples:
        for group, mib in rss.items():
            series[group].append((step, mib))

    half = steps // 2
    groups = sorted(series, key=lambda group: (group == RAY, group != DRIVER, group))
    figures = {group: dict(zip(("rss_half_mib", "rss_end_mib", "growth_pct_per_100_steps"),
                               growth(series[group], half))) for group in groups}
    steps_per_s = steps / summary["train_wall_s"]

    print(f"machine: {machine()}")
    print(f"{steps} steps, {steps_per_s:.3f} steps/s (periodic evals and checkpoints included), "
          f"{len(samples)} RSS samples every {args.interval:g} s")
    if len(attempts) > 1:
        print(f"WARNING: {len(attempts) - 1} role failure(s) and recovery; figures are the last attempt's, "
              f"from step {samples[0][0]}")
    columns = marks(steps)
    print(f"{'RSS MiB at step':<26}" + "".join(f"{mark:>9}" for mark in columns))
    for group in groups:
        # "At step m": the last sample while step m ran.
        at = [([mib for step, mib in series[group] if step < mark] or [float("nan")])[-1] for mark in columns]
        print(f"{group:<26}" + "".join(f"{mib:>9.0f}" for mib in at))
    print(f"\n{'role':<26}{f'RSS@{half} MiB':>14}{'RSS@end MiB':>14}{'growth %/100 steps':>20}")
    for group in groups:
        figure = figures[group]
        print(f"{group:<26}{figure['rss_half_mib']:>14.0f}{figure['rss_end_mib']:>14.0f}"
              f"{figure['growth_pct_per_100_steps']:>+20.2f}")
    job_roles = [group for group in groups if group != RAY]
    result = {"max_rss_growth_pct_per_100_steps":
              max((figures[group]["growth_pct_per_100_steps"] for group in job_roles), default=None),
              "ray_rss_growth_pct_per_100_steps": figures.get(RAY, {}).get("growth_pct_per_100_steps"),
              "roles": {group: {key: round(value, 3) for key, value in figure.items()}
                        for group, figure in figures.items()},
              "steps": steps, "steps_per_s": steps_per_s, "samples": len(samples), "restarts": len(attempts) - 1,
              "machine": machine()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
