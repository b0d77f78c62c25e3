"""Pipeline parallelism: schedules as data, their validator and simulator, one executor."""
from megalite.pipeline.actions import Action, parse_action, rank_stages, stage_to_rank
from megalite.pipeline.schedules import (SCHEDULE_NAMES, build_schedule, format_schedule,
                                         forward_schedule, load_schedule, save_schedule,
                                         schedule_info)
from megalite.pipeline.validate import validate_schedule
from megalite.parallel.partition import layers_per_stage, stage_layers
from megalite.pipeline.executor import PipelineResult, run_schedule
from megalite.pipeline.timeline import gather_spans, plot_timeline, write_chrome_trace

__all__ = ["Action", "SCHEDULE_NAMES", "build_schedule", "format_schedule",
           "forward_schedule", "load_schedule",
           "parse_action", "rank_stages", "save_schedule", "schedule_info",
           "stage_to_rank", "validate_schedule", "SimResult", "simulate_schedule",
           "layers_per_stage", "stage_layers", "PipelineResult", "run_schedule",
           "gather_spans", "plot_timeline", "write_chrome_trace"]


def __getattr__(name):
    # Imported on first use, so `python -m megalite.pipeline.simulate` runs its module fresh.
    if name in ("SimResult", "simulate_schedule"):
        from megalite.pipeline import simulate
        return getattr(simulate, name)
    raise AttributeError(f"module 'megalite.pipeline' has no attribute {name!r}")
