"""The console training prints its progress to (stderr, so a run's stdout stays for its results)."""

from rich.console import Console

console = Console(stderr=True)
