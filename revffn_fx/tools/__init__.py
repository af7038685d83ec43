"""Measuring and planning memory: benchmarks (revffn bench, --step), the analytic
estimator, the planner behind revffn plan, and the memory probes."""
