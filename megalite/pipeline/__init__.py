"""Pipeline parallelism: schedules as data, their validator and simulator, one executor."""
from megalite.pipeline.schedules import (Action, build_schedule, format_schedule, parse_action,
                                         validate_schedule)
from megalite.pipeline.simulate import SimResult, simulate_schedule
from megalite.parallel.partition import layers_per_stage, stage_layers
from megalite.pipeline.executor import PipelineResult, run_schedule
from megalite.pipeline.timeline import plot_timeline, write_chrome_trace

__all__ = ["Action", "build_schedule", "format_schedule", "parse_action", "validate_schedule",
           "SimResult", "simulate_schedule", "layers_per_stage", "stage_layers",
           "PipelineResult", "run_schedule", "plot_timeline", "write_chrome_trace"]
