"""Measuring and planning memory: benchmarks (revffn bench, --step), the analytic
estimator, the planner behind revffn plan, and the memory probes.

- ``bench.py``: run_bench (memory and time per depth and method); ``bench_result.py`` its
  result; ``bench_models.py`` the synthetic models and real-shaped presets both benches build;
- ``step_bench.py``: the whole-step peak per method (and its child process);
  ``step_methods.py`` the methods, ``step_result.py`` the result and plot;
- ``machine_info.py``: the machine a benchmark ran on;
- ``measure_memory.py``: the probes; ``estimate_memory.py``: the analytic estimator;
  ``memory_plan.py``: ``revffn plan``.

The ``revffn bench`` command itself is :mod:`revffn_fx.cli_bench`.
"""
