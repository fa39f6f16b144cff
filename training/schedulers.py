"""The sampling scheduler of a model folder, or another of diffusers' by name, on the folder's noise schedule."""

from __future__ import annotations

import diffusers
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from subjectpairs.errors import InputError

# What a folder without a class name samples with: the released model's scheduler.
DEFAULT_SCHEDULER = "PNDMScheduler"
# Those that take a Stable Diffusion noise schedule as they are (diffusers' list for its SD pipelines).
SCHEDULER_NAMES = tuple(member.name for member in KarrasDiffusionSchedulers)


def scheduler_class_name(name: str) -> str:
    """diffusers' class name for ``name``: a class name (``DDIMScheduler``) or its short form, any case
    (``ddim``, ``DPMSolverMultistep``)."""
    wanted = name.strip().lower().removesuffix("scheduler")
    for known in SCHEDULER_NAMES:
        if known.lower().removesuffix("scheduler") == wanted:
            return known
    short = ", ".join(known.removesuffix("Scheduler") for known in SCHEDULER_NAMES)
    raise InputError(f"--scheduler {name}: not one of diffusers' schedulers for Stable Diffusion ({short})")


def build_scheduler(config: dict, name: str | None = None) -> SchedulerMixin:
    """The scheduler ``config`` names (a folder's ``scheduler/``), or the one ``name`` names, built from the
    same config (beta schedule, steps offset), as diffusers' ``Scheduler.from_config(pipe.scheduler.config)``."""
    class_name = scheduler_class_name(name) if name else config.get("_class_name", DEFAULT_SCHEDULER)
    scheduler_class = getattr(diffusers, class_name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise InputError(f"scheduler/scheduler_config.json names {class_name!r}, which is not a diffusers scheduler")
    try:
        return scheduler_class.from_config(config)
    except ImportError as exc:  # a scheduler whose optional dependency is not installed
        raise InputError(f"scheduler {class_name}: {str(exc).splitlines()[0]}") from exc
