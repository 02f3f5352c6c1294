"""pocketlm: small, fast, task-specific language models on an ordinary CPU."""

__version__ = "0.1.0"
