"""Pipeline engine: schedule IR, generators, verifier, simulator, executor, stage splitting."""

from .execute import Executor, PipelineCommError, PipelineTimeoutError
from .generators import KINDS, decode, forward, generate, gpipe, interleaved, one_f_one_b
from .ir import Action, Schedule
from .simulate import Costs, Simulation, simulate
from .split import balance, by_count, measure, sequential_stages
from .verify import ScheduleError, peak_activations, verify

__all__ = [
    "KINDS", "Action", "Costs", "Executor", "PipelineCommError", "PipelineTimeoutError", "Schedule", "ScheduleError", "Simulation",
    "balance", "by_count", "decode", "forward", "generate", "gpipe", "interleaved", "measure", "one_f_one_b", "peak_activations",
    "sequential_stages", "simulate", "verify",
]  # fmt: skip
