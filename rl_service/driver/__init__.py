"""The driver side: everything that runs the Ray roles, and the only package (with `rl_service.cli`)
that imports `actors/` (DESIGN.md "Layering").

    trainer          prepare_job, run_training; Trainer.train_step, the RL step in one screen
    preference_loop  the DPO / BVPO trainer on the same skeleton (a batch becomes pairs, not rewards)
    training_run     the skeleton both share: start the roles, run the steps, replay a lost role
    step_loop        evaluate, step, checkpoint, log; the loop outcome
    rollout_client   generate + score fan-out, greedy eval, the step's phase timer
    step_rounds      a step's extra rounds (GVM step pilot, DAPO dynamic sampling)
    batch_source     where a step's prompts and sample counts come from (uniform, GVM)
    pipeline         the in-flight rollouts of async mode (how far ahead the driver launches)
    step_metrics     a step's logged row
    evaluation       accuracy per task group
    weight_sync      the driver's end of weight publication (one `publish` per step)
    roles            start, stop and place the Ray roles; start Ray
    elastic          generator-pool scaling at step boundaries
    run_dir          the run directory: config, metrics, checkpoints, summary
    jobs, job_runs, job_client   the Ray Jobs commands (submit, status, logs, stop, scale, report, resume)

`from rl_service.driver import prepare_job, run_training` is the programmatic entry point. The names
load on first use so that `import rl_service.driver.run_dir` (the CLI's cheap commands) pulls in
neither Ray nor torch.
"""
from __future__ import annotations

__all__ = ["prepare_job", "run_training"]


def __getattr__(name: str):
    if name in __all__:
        from rl_service.driver import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'rl_service.driver' has no attribute {name!r}")
