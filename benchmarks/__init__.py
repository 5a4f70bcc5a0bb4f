"""Benchmarks of the source repository (not installed): the harness of ``groupclip bench`` and stand-alone scripts."""
