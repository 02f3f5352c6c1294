"""Schemathesis hooks for the fuzzing test (loaded through SCHEMATHESIS_HOOKS): most generated requests
name the model the test server serves and ask for few tokens and sequences, so that they get past
routing and the max_tokens cap into the decoding code, where a bad sampling value would do harm, and
each stays quick enough for a fuzzing run on a real model."""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ.get("POCKETLM_FUZZ_MODEL", "tiny")
GENERATING = ("/v1/chat/completions", "/v1/completions")
FEW_TOKENS = 8
FEW_SEQUENCES = 2  # n, and prompts in one completions request: the work of one request stays small


@schemathesis.hook
def map_body(ctx, body):
    if not isinstance(body, dict) or ctx.operation is None or ctx.operation.path not in GENERATING:
        return body
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for key, most in (("max_tokens", FEW_TOKENS), ("max_completion_tokens", FEW_TOKENS), ("n", FEW_SEQUENCES)):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > most:
            body[key] = body[key] % most + 1
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        body["prompt"] = prompt[:FEW_SEQUENCES]
    return body
