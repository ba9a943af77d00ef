"""Kernel benchmarks: timing and ceilings (:mod:`.timing`), cases (:mod:`.kernels`), plots (:mod:`.plots`)."""
