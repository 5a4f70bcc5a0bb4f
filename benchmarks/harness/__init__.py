"""The benchmark harness behind ``groupclip bench``: presets, the suite, its worker processes, Opacus' modes, reports.

It ships with the source repository, not with the installed package: ``groupclip bench`` finds it in a checkout
(:mod:`groupclip.harness`), and ``python -m benchmarks.harness`` runs it from the repository root. The planner and
its cost model are part of the library (:mod:`groupclip.planning`).
"""
