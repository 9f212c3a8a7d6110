"""Private parts of :mod:`wus_tune.study` and :mod:`wus_tune.pareto`: spec, search space, objective, launch,
tracking, front maths, report, storage."""
