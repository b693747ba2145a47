"""The execution engine: plan a Jacobian-bound job as (row block x column block) tasks per layer step, then run
it on dask (synchronous, threads, processes, or a ``dask.distributed`` cluster) over zarr stores, with
checkpoint/resume and progress bars.

- :func:`plan_jacobian` -> :class:`Plan` (tasks, FLOPs, bytes, peak memory; nothing heavy has run);
- :func:`run_plan` / ``Plan.compute`` -> :class:`EngineResult`;
- :func:`estimate_wall_time`: wall time on W workers from measured task times and the task graph.

The engine decides *where* the block functions of :mod:`recurjac_scale.jacobian` run, never *what* they compute.
"""

from .estimate import estimate_wall_time, task_times_from_checkpoint
from .plan import Plan, StepPlan, plan_jacobian
from .result_store import EngineResult
from .run import run_plan

__all__ = [
    "EngineResult",
    "Plan",
    "StepPlan",
    "estimate_wall_time",
    "plan_jacobian",
    "run_plan",
    "task_times_from_checkpoint",
]
