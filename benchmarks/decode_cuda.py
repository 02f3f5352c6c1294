"""The CUDA path: correctness of every weight format against the CPU, and decode speed on a GPU.

Needs a CUDA machine with PyTorch (run from the repository root with PYTHONPATH=.). Nothing is
downloaded: correctness uses a tiny random model, speed a random model with SmolLM2-135M's shapes
(speed does not depend on the weights' values). Prints a Markdown table and a JSON line.

    PYTHONPATH=. python3 benchmarks/decode_cuda.py [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def random_model_dir(path: Path, config: dict) -> Path:
    from helpers import byte_level_tokenizer

    from pocketlm.checkpoint import save_model_dir
    from pocketlm.config import ModelConfig
    from pocketlm.model import LlamaForCausalLM

    model = LlamaForCausalLM(ModelConfig.from_dict(dict(config), source="bench")).init_weights(0.02, seed=0)
    return save_model_dir(path, config, model.state_dict(), byte_level_tokenizer())


def variants(src: Path, tmp: Path) -> dict[str, Path]:
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    return {"fp32": src, "int8": quantize_dir(src, tmp / "int8", QuantScheme("int8")),
            "int4": quantize_dir(src, tmp / "int4", QuantScheme("int4", 32))}


def check_correctness(tmp: Path) -> list[str]:
    from helpers import tiny_model_dir

    from pocketlm.checkpoint import load_model
    from pocketlm.engine import SamplingParams, compile_decoder, generate_batch, generate_tokens

    src = tiny_model_dir(tmp / "tiny", max_position_embeddings=512)
    lines = []
    for name, path in variants(src, tmp / "tiny-q").items():
        cpu, tok = load_model(path)
        gpu, _ = load_model(path, device="cuda")
        ids = tok.encode("the theory of the thing he said")
        with torch.no_grad():
            a, b = cpu(torch.tensor([ids])), gpu(torch.tensor([ids], device="cuda")).cpu()
        err = (a - b).abs().max().item()
        params = SamplingParams(max_new_tokens=24, ignore_eos=True)
        eager = list(generate_tokens(gpu, ids, params))
        eager_short = list(generate_tokens(gpu, ids[:4], params))
        batch = generate_batch(gpu, [ids, ids[:3]], params)
        compile_decoder(gpu)
        compiled = list(generate_tokens(gpu, ids, params))
        compiled = compiled if list(generate_tokens(gpu, ids[:4], params)) == eager_short else None
        reference = list(generate_tokens(cpu, ids, params))
        lines.append(f"{name}: max |logit cpu - cuda| {err:.2e}; greedy 24 tokens: cuda eager == cpu {eager == reference}, "
                     f"compiled == eager {compiled == eager}, batched == single {batch[0] == eager}")
    return lines


def decode_speed(path: Path, dtype, compile: bool, batch: int, tokens: int) -> float:
    from pocketlm.checkpoint import load_model
    from pocketlm.engine import SamplingParams, compile_decoder, generate_batch

    model, _ = load_model(path, device="cuda", dtype=dtype)
    if compile:
        compile_decoder(model)
    prompts = [list(range(10, 10 + 32 - i)) for i in range(batch)]
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    generate_batch(model, prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        outs = generate_batch(model, prompts, params)
        torch.cuda.synchronize()
        best = max(best, sum(len(o) for o in outs) / (time.perf_counter() - started))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for line in ([] if args.skip_check else check_correctness(tmp)):
            print(line, flush=True)
        paths = variants(random_model_dir(tmp / "smollm2-shaped", SMOLLM2_SHAPES), tmp / "q")
        print("\n| weights | activations | compiled | batch 1 tok/s | batch 32 tok/s |\n|---|---|---|---|---|")
        for name, path in paths.items():
            for dtype in ((torch.float32, torch.bfloat16) if name == "fp32" else (None,)):
                for compile in ((True,) if args.skip_eager else (False, True)):
                    speeds = [decode_speed(path, dtype, compile, b, args.tokens) for b in (1, 32)]
                    act = "bf16" if dtype == torch.bfloat16 else "fp32"
                    results[f"{name}-{act}-{'compiled' if compile else 'eager'}"] = speeds
                    print(f"| {name} | {act} | {compile} | {speeds[0]:.0f} | {speeds[1]:.0f} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
