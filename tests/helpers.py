"""Small builders for tests: random tiny Llama models saved as pocketlm model directories."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from pocketlm.checkpoint import save_model_dir
from pocketlm.tokenizer import Tokenizer


def byte_level_tokenizer(vocab_size: int = 300, extra_merges: list[tuple[str, str]] = ()) -> Tokenizer:
    """A byte-level BPE tokenizer with the 256 byte tokens, a few merges (and `extra_merges`), and <s>/</s>
    specials."""
    bytes_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(bytes_to_unicode))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), *extra_merges]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    assert backend.get_vocab_size() <= vocab_size
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template=template)


def tiny_config(**overrides) -> dict:
    config = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    config.update(overrides)
    return config


def tiny_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama written as a pocketlm model directory (weights from transformers' init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**config))
    # transformers' init leaves norms at 1; perturb them so a mix-up of norm weights would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return save_model_dir(path, config, hf.state_dict(), byte_level_tokenizer())


def tiny_mixture_dir(path: Path, seed: int = 3, **overrides) -> Path:
    """A random tiny mixture of 4 experts (top 2), Mixtral's or (model_type qwen2_moe) with Qwen2-MoE's fields,
    as a pocketlm model directory. Weights from pocketlm's init at std 0.1, so the routing spreads."""
    from pocketlm.config import ModelConfig
    from pocketlm.model import LlamaForCausalLM

    fields = tiny_config(num_local_experts=4, num_experts_per_tok=2, **overrides)
    if fields.get("model_type") == "qwen2_moe":
        fields["num_experts"] = fields.pop("num_local_experts")
    model = LlamaForCausalLM(ModelConfig.from_dict(fields)).init_weights(std=0.1, seed=seed)
    return save_model_dir(path, fields, model.state_dict(), byte_level_tokenizer())


def llama_cpp_agreement(llm, model, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """Along pocketlm's greedy continuation (n tokens per prompt), compare llama.cpp's next-token choice (a
    llama_cpp.Llama made with logits_all=True) with pocketlm's full forward pass on the same tokens.

    Returns (the fraction of positions at which the two pick the same token, the widest near-tie): the most,
    over positions where they part, by which pocketlm's top logit exceeds its logit for llama.cpp's pick.
    Rounding activations to 8 bits (llama.cpp's quantized matmuls, pocketlm's qdot decode) moves logits by a
    little, so choices may part where two tokens are nearly tied, never where pocketlm's margin is wide."""
    import numpy as np

    from pocketlm.engine import SamplingParams, generate_tokens

    agree = total = 0
    widest = 0.0
    for ids in prompts:
        ours = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        llm.reset()
        llm.eval(ids + ours[:-1])
        theirs = np.array(llm.scores[len(ids) - 1: len(ids) + len(ours) - 1]).argmax(-1)
        with torch.no_grad():
            logits = model(torch.tensor([ids + ours[:-1]]))[0, len(ids) - 1:].float()
        top = logits.argmax(-1).numpy()
        agree += int((theirs == top).sum())
        total += len(ours)
        picked = logits[torch.arange(len(ours)), torch.from_numpy(theirs)]
        widest = max(widest, float((logits.max(-1).values - picked).max()))
    return agree / total, widest


def write_text_pdf(path: Path, pages: list[str]) -> Path:
    """A small valid PDF whose pages hold these lines of text (Helvetica), written by hand so that tests
    need no PDF-writing library; pypdf's text extraction reads it back."""
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               ("<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(n)) + f"] /Count {n} >>").encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, page in enumerate(pages):
        lines = "".join(f"({escape(line)}) Tj T* " for line in page.splitlines())
        stream = f"BT /F1 11 Tf 14 TL 72 720 Td {lines}ET".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path
