"""Private parts of :mod:`wus_tune.study`: spec, search space, objective, tracking, report, storage."""
