"""Benchmarks: methods side by side on one engine (speed, memory, accuracy vs budget) and their plots."""

from .accuracy import AccuracySettings, calibrate_text_threshold, kept_image_tokens, run_accuracy
from .methods import ForcedTextPolicy, Method, methods_at_budget
from .speed import PeakRss, Workload, measure_methods
from .suite import SpeedSettings, run_speed, speed_table, write_report
from .workloads import (
    load_world_model,
    next_random_workload,
    qwen_random_workload,
    random_workload,
    wide_model,
    wide_next_model,
    wide_qwen_model,
    world_workload,
)

__all__ = [
    "AccuracySettings", "ForcedTextPolicy", "Method", "PeakRss", "SpeedSettings", "Workload", "calibrate_text_threshold",
    "kept_image_tokens", "load_world_model", "measure_methods", "methods_at_budget", "random_workload", "run_accuracy",
    "run_speed", "speed_table", "wide_model", "wide_next_model", "wide_qwen_model", "next_random_workload",
    "qwen_random_workload", "world_workload", "write_report",
]
