"""Schemathesis hooks for the fuzzing test (loaded through SCHEMATHESIS_HOOKS): most generated requests
name the model the test server serves and ask for few tokens, so that they get past routing and the
max_tokens cap into the decoding code, where a bad sampling value would do harm."""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ.get("POCKETLM_FUZZ_MODEL", "tiny")
GENERATING = ("/v1/chat/completions", "/v1/completions")
FEW_TOKENS = 8


@schemathesis.hook
def map_body(ctx, body):
    if not isinstance(body, dict) or ctx.operation is None or ctx.operation.path not in GENERATING:
        return body
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > FEW_TOKENS:
            body[key] = body[key] % FEW_TOKENS + 1
    return body
