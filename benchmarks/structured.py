"""What constrained decoding costs on SmolLM2-135M-Instruct: the grammar's per-token mask time (p50 / p99),
the time to the first mask (checking the schema, then the first mask), and decode tokens/s at batch 1 and 8
with and without a JSON Schema, in one process, the two interleaved.

The constrained runs use a schema that cannot end early (an array of at least 60 short strings), so both
runs decode the same number of tokens; the free run ignores EOS.

    .venv/bin/python benchmarks/structured.py [--tokens 64] [--repeats 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LONG = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 60}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


def decode_rate(model, prompt, params, stops) -> tuple[float, int]:
    """Decode tokens/s after the first token (prefill excluded), and the tokens decoded."""
    from pocketlm.engine import generate_tokens

    stamps = [time.perf_counter() for _ in generate_tokens(model, prompt, params, stops)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from pocketlm.constrain import Constraint
    from pocketlm.engine import SamplingParams, eos_ids, generate_batch
    from pocketlm.loading import open_model
    from pocketlm.streaming import chat_prompt, compile_constraint

    torch.set_num_threads(args.threads)
    model, tokenizer = open_model("smollm2-135m-instruct")
    stops = eos_ids(model, tokenizer)
    ask = "List short words as a JSON array of strings."
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": ask}])

    started = time.perf_counter()
    compile_constraint(model, tokenizer, Constraint("json_object"))  # llguidance's tokenizer, built once per tokenizer
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    person = compile_constraint(model, tokenizer, Constraint("json_schema", PERSON))
    guide = person.guide()
    guide.allowed(model.config.vocab_size)
    first_mask_ms = (time.perf_counter() - started) * 1e3

    long = compile_constraint(model, tokenizer, Constraint("json_schema", LONG))
    # per-token mask time along a real constrained answer
    masks = []
    guide = long.guide()
    from pocketlm.engine import generate_tokens
    for token in generate_tokens(model, prompt, SamplingParams(max_new_tokens=args.tokens, grammar=long), stops):
        started = time.perf_counter()
        guide.allowed(model.config.vocab_size)
        masks.append((time.perf_counter() - started) * 1e3)
        guide.advance(token)
    masks.sort()

    free = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=args.tokens, grammar=long)
    rows = {"free": [], "constrained": []}
    batch_rows = {"free": [], "constrained": []}
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": f"{ask} Start with word number {i}."}]) for i in range(8)]
    for _ in range(args.repeats):
        for name, params in (("free", free), ("constrained", constrained)):
            rate, n = decode_rate(model, prompt, params, stops)
            assert n == args.tokens, (name, n)
            rows[name].append(rate)
            started = time.perf_counter()
            outs = generate_batch(model, prompts, params, stops)
            elapsed = time.perf_counter() - started
            assert all(len(o) == args.tokens for o in outs), (name, [len(o) for o in outs])
            batch_rows[name].append(sum(len(o) for o in outs) / elapsed)

    result = {
        "machine": _machine(), "threads": args.threads, "tokens": args.tokens,
        "llguidance_tokenizer_s": round(tokenizer_s, 3), "first_mask_ms": round(first_mask_ms, 2),
        "mask_ms_p50": round(masks[len(masks) // 2], 3), "mask_ms_p99": round(masks[min(len(masks) - 1, int(len(masks) * 0.99))], 3),
        "batch1_tok_s": {k: round(statistics.median(v), 1) for k, v in rows.items()},
        "batch8_tok_s": {k: round(statistics.median(v), 1) for k, v in batch_rows.items()},
    }
    for key in ("batch1_tok_s", "batch8_tok_s"):
        result[key]["constrained_vs_free"] = round(result[key]["constrained"] / result[key]["free"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _machine() -> str:
    import platform
    import subprocess

    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
        family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("CPU family")), "?")
        flags = next((line for line in info.splitlines() if line.startswith("Flags")), "")
        kinds = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags.split()]
        return f"{name} (family {family}; {' '.join(kinds) or 'AVX2 only'})"
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
