"""pocketlm: small, fast, task-specific language models on an ordinary CPU."""

import os
import sys

__version__ = "0.1.0"

if "torch" not in sys.modules:
    # OpenMP's idle threads (PyTorch's ops) spin 300,000 rounds by default after each parallel region; between
    # the decode steps of a batch they then hold a core the decode step's own threads need (a 32-row SmolLM2
    # step took 36 ms instead of 28). 10,000 rounds is still longer than the gaps within a training step
    # (docs/benchmarks-history.md). libgomp reads this when torch loads it, so only if torch is not loaded yet.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
