"""Benchmark scripts (run them as files: `.venv/bin/python benchmarks/NAME.py`). A regular package, not a
namespace one: opacus 1.6 installs a top-level `benchmarks` package of its own, which would otherwise shadow
this folder for `from benchmarks.x import ...`."""
