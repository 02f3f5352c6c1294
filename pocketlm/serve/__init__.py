"""Serving: an OpenAI-compatible server with continuous batching, A/B variants, feedback, metrics, drift."""
