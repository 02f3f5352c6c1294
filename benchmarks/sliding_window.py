"""Decoding far past a sliding window: a rolling cache (a window of slots per layer) against a full cache.

SmolLM2-135M-Instruct's weights under a Mistral config with `sliding_window` W (default 128): the same model
either way, so the greedy tokens must be identical. Generates 4 W tokens after a short prompt, one token a
step through `decode_step` (the path generation and the server take), first with the rolling cache pocketlm
sets up for windowed layers, then with whole caches (`setup_cache(rolling=False)`, what speculative decoding
uses). Reports the KV cache's bytes, tokens/s and whether the tokens agree.

    .venv/bin/python benchmarks/sliding_window.py [--window 128] [--tokens N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_and_decode import machine  # noqa: E402


def windowed_copy(model_dir: Path, out: Path, window: int) -> Path:
    """A model directory with `model_dir`'s weights and tokenizer under a Mistral config with `window`."""
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config.update(sliding_window=window, model_type="mistral", architectures=["MistralForCausalLM"])
    (out / "config.json").write_text(json.dumps(config))
    return out


def greedy(model, prompt: list[int], tokens: int, rolling: bool) -> tuple[list[int], float, int]:
    """(tokens, seconds for the decode steps, KV cache bytes) of greedy decoding, one token a step."""
    with torch.inference_mode():
        model.setup_cache(1, len(prompt) + tokens, rolling=rolling)
        cache_bytes = sum(layer.self_attn.cache.k.nbytes + layer.self_attn.cache.v.nbytes for layer in model.model.layers)
        hidden = model.hidden_states(torch.tensor([prompt]))
        out = [int(model.lm_head(hidden[:, -1]).argmax())]
        started = time.perf_counter()
        for t in range(tokens - 1):
            pos = torch.tensor([len(prompt) + t])
            logits = model.decode_step(torch.tensor([[out[-1]]]), pos, model.decode_mask(pos))
            out.append(int(logits.argmax()))
        seconds = time.perf_counter() - started
        model.clear_cache()
    return out, seconds, cache_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (default 4 x the window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pocketlm.checkpoint import load_model
    from pocketlm.hub import pull
    from pocketlm.streaming import chat_prompt

    tokens = args.tokens or 4 * args.window
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model(windowed_copy(Path(pull("smollm2-135m-instruct")), Path(tmp) / "m", args.window))
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    runs = {}
    for name, rolling in (("rolling cache", True), ("full cache", False), ("rolling cache ", True)):
        out, seconds, cache_bytes = greedy(model, prompt, tokens, rolling)
        runs.setdefault(name.strip(), []).append({"tokens": out, "seconds": seconds, "cache_bytes": cache_bytes})
    same = runs["rolling cache"][0]["tokens"] == runs["full cache"][0]["tokens"] == runs["rolling cache"][1]["tokens"]
    print(f"{machine()}; {args.threads} threads")
    print(f"SmolLM2-135M-Instruct as Mistral, sliding_window {args.window}, prompt {len(prompt)} tokens, "
          f"{tokens} new tokens ({(len(prompt) + tokens) / args.window:.1f}x the window), fp32:")
    results = {"machine": machine(), "window": args.window, "prompt": len(prompt), "tokens": tokens, "same_tokens": same}
    for name, rs in runs.items():
        best = min(r["seconds"] for r in rs)
        rate = (tokens - 1) / best
        print(f"  {name:14} KV cache {rs[0]['cache_bytes'] / 2**20:7.2f} MiB   {rate:6.1f} tokens/s")
        results[name] = {"cache_mib": rs[0]["cache_bytes"] / 2**20, "tokens_per_s": rate}
    print(f"  same tokens: {same}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
