"""Alternate-call timing for the CPU benchmarks (profile_cpu_step.py,
bench_conv_cpu.py, bench_elementwise_cpu.py): each candidate is called once
per round, one after the other, so that background load hits all alike."""

import time
from typing import Callable


def time_rounds(calls: dict[str, Callable[[], float]], rounds: int
                ) -> dict[str, list[float]]:
  """One warm-up call each, then ``rounds`` rounds of one call of each; every
  call returns its own seconds. Returns the seconds by name."""
  for call in calls.values():
    call()
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      times[name].append(call())
  return times


def timed(call: Callable[[], object]) -> Callable[[], float]:
  """``call`` made to return its own seconds (for ``time_rounds``); it must
  block until its work is done (``jax.block_until_ready``)."""
  def seconds() -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
  return seconds
