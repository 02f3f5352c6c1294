"""Mixtures of experts against dense models, three ways (`--part`, default all three):

train     recipes/tinystories-moe.yaml (8 experts of intermediate 352 in every layer, top 2) against
          recipes/tinystories.yaml (dense, intermediate 704: the parameters each token runs are the same),
          same data, tokens and steps: validation loss at the end, median step time after the first 50 steps
          (compilation and warm-up), parameters.
upcycle   the dense recipe trained --base-steps, then either trained --steps more as it is or upcycled
          (`pocketlm upcycle`, 8 copies of its MLP, top 2) and trained the same --steps: validation loss of
          each, and the step time of each.
decode    batch-1 greedy decoding of an int4 mixture against the dense int4 model with the same active
          parameters: SmolLM2-135M-Instruct (intermediate 1536) against its shape with 8 experts of 768, top 2
          (random weights: the speed of a step does not depend on them), both through the whole-step kernel.

Every training run is `pocketlm train` in its own process, one after the other on the same machine.

    .venv/bin/python benchmarks/moe.py [--part train upcycle decode] [--steps 800] [--base-steps 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

DENSE, MOE = "recipes/tinystories.yaml", "recipes/tinystories-moe.yaml"
POCKETLM = str(REPO / ".venv" / "bin" / "pocketlm")


def train(recipe: str | Path, out: Path, steps: int, **overrides) -> dict:
    """Train one recipe for `steps` steps; (val loss, median ms a step, parameters) from its log and model."""
    extra = [f"{k}={v}" for k, v in overrides.items()]
    cmd = [POCKETLM, "train", str(recipe), f"out_dir={out}", f"train.max_steps={steps}", f"eval.interval={steps}",
           "log.progress=false", *extra]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    from pocketlm.checkpoint import load_model

    model, _ = load_model(out / "model")
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    active = total - (config.num_local_experts - config.num_experts_per_tok) * per_expert if config.moe else total
    warm = [r["ms"] for r in records if "ms" in r and r["step"] > min(50, steps // 2)]
    return {"val_loss": next(r["val_loss"] for r in reversed(records) if "val_loss" in r),
            "ms_per_step": statistics.median(warm), "router_loss": records[-1].get("router_loss"),
            "parameters": total, "active_parameters": active}


def continued(recipe: str, init_from: Path, out: Path) -> Path:
    """`recipe` rewritten to start from the model directory `init_from` instead of a new model's shape."""
    spec = yaml.safe_load((REPO / recipe).read_text())
    spec.pop("model", None)
    spec["init_from"] = str(init_from)
    spec["data"]["tokenizer"] = str(init_from)  # the model's own tokens
    spec["data"]["source"] = str((REPO / spec["data"]["source"]).resolve())
    out.write_text(yaml.safe_dump(spec))
    return out


def table(results: dict) -> None:
    print(f"{'model':32} {'parameters':>11} {'active':>11} {'val loss':>9} {'ms/step':>8} {'router loss':>12}")
    for name, r in results.items():
        router = f"{r['router_loss']:.3f}" if r["router_loss"] is not None else "-"
        print(f"{name:32} {r['parameters']:>11,} {r['active_parameters']:>11,} {r['val_loss']:9.4f} "
              f"{r['ms_per_step']:8.1f} {router:>12}")
    moe, dense = results.values()
    print(f"step time ratio (moe / dense): {moe['ms_per_step'] / dense['ms_per_step']:.2f}x; "
          f"val loss difference (moe - dense): {moe['val_loss'] - dense['val_loss']:+.4f}")


def part_train(steps: int, tmp: Path) -> dict:
    results = {"moe (8 experts, top 2)": train(MOE, tmp / "moe", steps),
               "dense (same active)": train(DENSE, tmp / "dense", steps)}
    print(f"TinyStories (lowercased 4M), {steps} steps of 16 x 256 tokens, each recipe's own settings:")
    table(results)
    return results


def part_upcycle(base_steps: int, steps: int, tmp: Path) -> dict:
    train(DENSE, tmp / "base", base_steps)
    base = tmp / "base" / "model"
    subprocess.run([POCKETLM, "upcycle", str(base), str(tmp / "up"), "--experts", "8", "--top-k", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    results = {"upcycled (8 x 704, top 2)": train(continued(DENSE, tmp / "up", tmp / "up.yaml"), tmp / "up-run", steps),
               "dense continued": train(continued(DENSE, base, tmp / "dense.yaml"), tmp / "dense-run", steps)}
    print(f"recipes/tinystories.yaml trained {base_steps} steps, then {steps} more steps of 16 x 256 tokens "
          "as it is or upcycled:")
    table(results)
    return results


def part_decode(tokens: int, tmp: Path) -> dict:
    import torch

    from pocketlm.checkpoint import load_config, load_model, save_model_dir
    from pocketlm.config import ModelConfig
    from pocketlm.engine import SamplingParams, generate_tokens
    from pocketlm.hub import pull
    from pocketlm.model import LlamaForCausalLM
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    torch.set_num_threads(2)
    scheme = QuantScheme("int4", 32)
    dense_dir = Path(pull("smollm2-135m-instruct"))
    config = {k: v for k, v in load_config(dense_dir).to_hf_dict().items() if k not in ("architectures", "model_type")}
    moe_config = {**config, "num_local_experts": 8, "num_experts_per_tok": 2,
                  "intermediate_size": config["intermediate_size"] // 2}
    _, tokenizer = load_model(dense_dir)
    moe = LlamaForCausalLM(ModelConfig.from_dict(moe_config)).init_weights(seed=0)
    dirs = {"dense int4 (SmolLM2-135M)": quantize_dir(dense_dir, tmp / "dense-int4", scheme),
            "moe int4 (8 x 768, top 2)": quantize_dir(save_model_dir(tmp / "moe", moe_config, moe.state_dict(), tokenizer),
                                                      tmp / "moe-int4", scheme)}
    del moe
    prompt = tokenizer.encode("Once upon a time")
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    results = {}
    for name, d in dirs.items():
        model, _ = load_model(d)
        list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True)))  # warm
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            n = len(list(generate_tokens(model, prompt, params)))
            runs.append((time.perf_counter() - started) / n * 1000)
        results[name] = {"ms_per_token": min(runs), "kernel": model._native_step is not None,
                         "weights_mib": sum(t.nbytes for t in model.state_dict().values()) / 2**20}
        del model
    print(f"batch-1 greedy decoding, {tokens} new tokens, best of 3, int4 (group 32), 2 threads:")
    for name, r in results.items():
        print(f"  {name:28} {r['ms_per_token']:6.2f} ms/token   weights {r['weights_mib']:6.1f} MiB   "
              f"whole-step kernel: {r['kernel']}")
    moe_ms, dense_ms = (r["ms_per_token"] for r in reversed(results.values()))
    print(f"  time per token, moe / dense: {moe_ms / dense_ms:.2f}x")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=["train", "upcycle", "decode"], default=["train", "upcycle", "decode"])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decoding run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(machine())
    results = {"machine": machine(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "train" in args.part:
            results["train"] = part_train(args.steps, tmp)
        if "upcycle" in args.part:
            results["upcycle"] = part_upcycle(args.base_steps, args.steps, tmp)
        if "decode" in args.part:
            results["decode"] = part_decode(args.tokens, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
