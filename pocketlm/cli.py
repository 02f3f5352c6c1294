"""`pocketlm ...`: a thin command-line layer; every command calls a library function you can import.

Each command imports its stage inside its function: importing every stage here would cost each
invocation, `pocketlm --help` included, about 3 s of imports (torch, fastapi, the evaluators) it may
not need. Nothing imports this module, so these imports cannot form a cycle.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import ConfigError, PocketLMError

app = typer.Typer(
    help="pocketlm: small, fast, task-specific language models on an ordinary CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)  # a printed path is never folded: scripts and `pocketlm run` read it
err = Console(stderr=True)


def _load(model: str, compile: bool = False):
    from .engine import compile_decoder
    from .loading import open_model

    lm, tokenizer = open_model(model)
    if compile:
        compile_decoder(lm)
    return lm, tokenizer


def _load_draft(draft: str | None, lm, tokenizer):
    """The draft model for speculative decoding, checked against the target's vocabulary and tokenizer."""
    if draft is None:
        return None
    from .speculative import check_compatible

    draft_lm, draft_tokenizer = _load(draft)
    check_compatible(lm, draft_lm, tokenizer, draft_tokenizer)
    return draft_lm


DRAFT_HELP = ("a smaller model with the same tokenizer for speculative decoding: it proposes tokens, the model checks "
              "them in one pass, the output is distributed as the model's own; an int4 copy (`pocketlm quantize`) fits")
COMPILE_HELP = "compile the decode step with torch.compile (1-2 minutes once for SmolLM2 on 2 cores; then 2-4x faster on the CPU)"


def _params(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop):
    from .engine import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []))


def _constraint_options():
    """The output-constraint options `generate`, `chat` and `eval` share (at most one of them)."""
    return {
        "json_schema": typer.Option(None, "--json-schema", help="a JSON Schema file: the output is JSON that it accepts"),
        "regex": typer.Option(None, "--regex", help="the output matches this regular expression (Rust regex syntax)"),
        "grammar": typer.Option(None, "--grammar", help="a Lark grammar file (llguidance's dialect): the output is in its language"),
        "choice": typer.Option(None, "--choice", help="the output is one of these strings (repeatable)"),
    }


def _constraint(json_schema: Path | None, regex: str | None, grammar: Path | None, choice: list[str] | None):
    """The one output constraint the options give (files read), or None."""
    from .constrain import Constraint

    given = [(kind, value) for kind, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                                ("choice", choice)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError("give one of --json-schema, --regex, --grammar or --choice, not several")
    kind, value = given[0]
    if kind in ("json_schema", "grammar"):
        try:
            value = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            what = "JSON Schema" if kind == "json_schema" else "grammar"
            raise ConfigError(f"{value}: cannot read the {what} file ({exc.__class__.__name__})") from None
    return Constraint(kind, value)


def _constrained(params, lm, tokenizer, json_schema: Path | None, regex: str | None, grammar: Path | None,
                 choice: list[str] | None):
    """params with the grammar of the one constraint given, checked against the model (or unchanged)."""
    import dataclasses

    from .streaming import compile_constraint

    constraint = _constraint(json_schema, regex, grammar, choice)
    if constraint is None:
        return params
    return dataclasses.replace(params, grammar=compile_constraint(lm, tokenizer, constraint))


@app.command("import")
def import_cmd(
    src: Path = typer.Argument(..., help="Hugging Face directory, .gguf file, or llama2.c .bin checkpoint"),
    dest: Path = typer.Argument(..., help="model directory to write"),
    tokenizer: Optional[Path] = typer.Option(None, help="SentencePiece .model for a llama2.c checkpoint"),
):
    """Import a pretrained model into a pocketlm model directory."""
    from .convert import import_model

    started = time.perf_counter()
    path = import_model(src, dest, tokenizer=tokenizer)
    err.print(f"imported {src} in {time.perf_counter() - started:.1f} s")
    out.print(str(path), highlight=False)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="model directory or name"),
    dest: Path = typer.Argument(..., help="file to write"),
    format: str = typer.Option("gguf", "--format", "-f", help="gguf or llama2c"),
    outtype: str = typer.Option("auto", help="GGUF tensor type: f32, f16, q8_0, q4_0, or auto (a quantized "
                                             "model's own type: int8 -> q8_0, int4 -> q4_1 / q4_0; else f16)"),
):
    """Export a model directory to GGUF (llama.cpp) or llama2.c's .bin."""
    from .convert import export_model
    from .hub import resolve_model

    path = export_model(resolve_model(model), dest, format, outtype=outtype)
    out.print(str(path), highlight=False)


@app.command("pull")
def pull_cmd(name: str = typer.Argument(..., help="a known model name (smollm2-135m-instruct) or hf:ORG/NAME")):
    """Download and import a model into the cache (once); print its directory."""
    from .hub import pull

    with err.status(f"pulling {name} ..."):
        path = pull(name)
    out.print(str(path), highlight=False)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="model directory or name"),
    prompt: str = typer.Argument(..., help="text to continue"),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    chat_template: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    draft: Optional[str] = typer.Option(None, help=DRAFT_HELP),
    draft_tokens: int = typer.Option(4, help="tokens the draft proposes per step"),
    json_schema: Optional[Path] = _constraint_options()["json_schema"],
    regex: Optional[str] = _constraint_options()["regex"],
    grammar: Optional[Path] = _constraint_options()["grammar"],
    choice: Optional[list[str]] = _constraint_options()["choice"],
):
    """Continue a prompt, streaming the text."""
    from .streaming import chat_prompt, stream

    params = _params(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    lm, tokenizer = _load(model, compile)
    params = _constrained(params, lm, tokenizer, json_schema, regex, grammar, choice)
    draft_lm = _load_draft(draft, lm, tokenizer)
    source = chat_prompt(tokenizer, [{"role": "user", "content": prompt}]) if chat_template else prompt
    if not chat_template:
        sys.stdout.write(prompt)
    info: dict = {}
    started = time.perf_counter()
    for piece in stream(lm, tokenizer, source, params, result=info, draft=draft_lm, draft_tokens=draft_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    n = len(info["token_ids"])
    line = f"{n} tokens in {elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} tokens/s), finish: {info['finish_reason']}"
    if "speculative" in info:
        stats = info["speculative"]
        line += f"; draft acceptance {stats.acceptance_rate:.0%}, {stats.tokens_per_pass:.2f} tokens per target pass"
    err.print(f"[dim]{line}[/dim]")


@app.command("chat")
def chat_cmd(
    model: str = typer.Argument("smollm2-135m-instruct", help="model directory or name"),
    system: Optional[str] = typer.Option(None, help="system message"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    draft: Optional[str] = typer.Option(None, help=DRAFT_HELP),
    draft_tokens: int = typer.Option(4, help="tokens the draft proposes per step"),
    json_schema: Optional[Path] = _constraint_options()["json_schema"],
    regex: Optional[str] = _constraint_options()["regex"],
    grammar: Optional[Path] = _constraint_options()["grammar"],
    choice: Optional[list[str]] = _constraint_options()["choice"],
):
    """Chat with a model in the terminal (streams; /reset clears the conversation, /exit or Ctrl-D quits)."""
    from .streaming import fit_conversation, stream
    from .errors import ContextLengthError

    params = _params(max_tokens, temperature, 0, top_p, 1.0, seed, None)
    with err.status(f"loading {model} ..."):
        lm, tokenizer = _load(model, compile)
        draft_lm = _load_draft(draft, lm, tokenizer)
        params = _constrained(params, lm, tokenizer, json_schema, regex, grammar, choice)
    if not tokenizer.chat_template:
        raise PocketLMError(f"{model} has no chat template; use `pocketlm generate` for plain text continuation")
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("[dim]chatting; /reset clears the conversation, /exit or Ctrl-D quits[/dim]")
    from .speculative import SpeculativeStats

    drafting = SpeculativeStats()  # the draft's record over the whole conversation
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if system else []
            continue
        if not interactive:
            out.print(f"you> {line}", highlight=False)
        try:  # a long conversation forgets its oldest exchanges rather than failing
            ids, messages = fit_conversation(tokenizer, messages + [{"role": "user", "content": line}],
                                             lm.config.max_position_embeddings, max_tokens)
        except ContextLengthError as exc:
            err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            continue
        sys.stdout.write("assistant> ")
        reply, info = [], {}
        try:
            for piece in stream(lm, tokenizer, ids, params, result=info, draft=draft_lm, draft_tokens=draft_tokens):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this answer, keep what was said
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        if "speculative" in info:
            drafting.add(info["speculative"])
    if drafting.target_passes:
        err.print(f"[dim]draft acceptance {drafting.acceptance_rate:.0%}, "
                  f"{drafting.tokens_per_pass:.2f} tokens per target pass[/dim]")


@app.command("prepare")
def prepare_cmd(
    inputs: list[str] = typer.Argument(..., help="text/jsonl/json/parquet files, folders, globs, or hf:NAME[@split]"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="directory to write (train.bin, val.bin, tokenizer/, manifest.json)"),
    tokenizer: str = typer.Option("bpe", help="bpe, char, or a model directory whose tokenizer is reused"),
    vocab_size: int = typer.Option(8192, help="vocabulary size for a new BPE tokenizer"),
    field: str = typer.Option("text", help="the text field of jsonl/json/parquet records"),
    doc_separator: Optional[str] = typer.Option(None, help="split text files into documents: 'blank-line' or a literal string"),
    normalization: str = typer.Option("NFC", help="NFC, NFKC or none"),
    dedupe: bool = typer.Option(True, help="remove exact and near-duplicate documents"),
    near_dup_threshold: float = typer.Option(0.8, help="Jaccard similarity above which documents are near duplicates"),
    min_chars: int = typer.Option(1), max_chars: Optional[int] = typer.Option(None),
    scrub_pii: bool = typer.Option(True, help="replace e-mails, phone numbers, IPs and card numbers with placeholders"),
    val_fraction: float = typer.Option(0.1, help="the last fraction of the token stream kept for validation"),
    strict: bool = typer.Option(False, help="stop at the first file that is not UTF-8 text instead of skipping it"),
):
    """Clean, deduplicate, scrub and tokenize text into memory-mapped training shards."""
    from .data import prepare

    report = prepare(inputs, out_dir, tokenizer=tokenizer, vocab_size=vocab_size, field=field,
                     doc_separator=doc_separator, normalization=normalization, dedupe=dedupe,
                     near_dup_threshold=near_dup_threshold, min_chars=min_chars, max_chars=max_chars,
                     scrub_pii=scrub_pii, val_fraction=val_fraction, strict=strict, progress=True)
    for line in report.summary_lines():
        err.print(line, highlight=False)
    out.print(str(out_dir), highlight=False)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="a YAML recipe (see recipes/)"),
):
    """Train from a recipe; key=value arguments override recipe fields (e.g. train.max_steps=100 resume=true)."""
    from .train import load_recipe, train

    loaded = load_recipe(recipe, overrides=list(ctx.args))
    final = train(loaded)
    if int(os.environ.get("RANK", "0")) == 0:
        out.print(str(final), highlight=False)


@app.command("distill-cache", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def distill_cache_cmd(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="a distillation recipe (logits mode, with distill.cache_top_k)"),
):
    """Compute the teacher's top-k logits for every step of a distillation recipe, without training; student runs
    of the recipe read them with distill.cache_dir=THE_PRINTED_FOLDER (a pipeline's teacher stage). key=value
    arguments override recipe fields, as for train."""
    from .train import load_recipe
    from .train.loop import fill_teacher_cache

    loaded = load_recipe(recipe, overrides=list(ctx.args))
    started = time.perf_counter()
    folder = fill_teacher_cache(loaded)
    err.print(f"teacher top-{loaded.distill.cache_top_k} logits for {loaded.train.max_steps} steps in "
              f"{time.perf_counter() - started:.1f} s", highlight=False)
    out.print(str(folder), highlight=False)


@app.command("federate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def federate_cmd(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="a YAML recipe with a `federated:` section (see recipes/)"),
    work: Optional[Path] = typer.Option(None, "--work", help="where shards, round checkpoints and Flower's "
                                        "processes' logs go (default OUT_DIR/federated)"),
):
    """Federated training on Flower: a SuperLink and one SuperNode per client on this machine; key=value
    arguments override recipe fields (e.g. federated.rounds=4 resume=true)."""
    from .train import load_recipe
    from .train.federated import federate

    loaded = load_recipe(recipe, overrides=list(ctx.args))
    spec = loaded.federated
    if spec is not None:
        err.print(f"federated {spec.strategy}: {spec.clients} clients, {spec.rounds} rounds of {spec.local_steps} "
                  f"local steps, {spec.partition.method} partition", highlight=False)

    def report(record: dict) -> None:
        losses = ", ".join(f"{name} {record[key]:.4f}" for key, name in (("train_loss", "train loss"),
                                                                          ("val_loss", "val loss"))
                           if record.get(key) is not None)
        failed = f", {record['failed']} failed" if record.get("failed") else ""
        err.print(f"round {record['round']}/{spec.rounds}: clients {record['clients']}{failed}, {losses}, "
                  f"{(record['bytes_down'] + record['bytes_up']) / 1e6:.2f} MB sent, {record['seconds']:.1f} s",
                  highlight=False)

    result = federate(loaded, work=work, on_round=report)
    if result.restarts:
        err.print(f"the SuperLink was restarted {result.restarts} time(s); the run resumed from its round checkpoint",
                  highlight=False)
    out.print(str(result.model_dir), highlight=False)


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="model directory or name (float weights)"),
    dest: Path = typer.Argument(..., help="model directory to write"),
    to: str = typer.Option(..., "--to", help="int8 (per-channel) or int4 (group-wise)"),
    group_size: int = typer.Option(32, help="int4 only: columns per group (32, 64 or 128)"),
    symmetric: bool = typer.Option(False, help="int4 only: symmetric codes (exports as GGUF Q4_0 instead of Q4_1)"),
    head: bool = typer.Option(True, help="also quantize the output head and the embedding (to int8)"),
):
    """Weight-only quantization of every linear layer; the result loads straight into its quantized form."""
    from .checkpoint import WEIGHTS
    from .hub import resolve_model
    from .quant import QuantScheme
    from .quantize import quantize_dir

    scheme = QuantScheme(to, group_size if to == "int4" else None, symmetric=symmetric, head=head)
    started = time.perf_counter()
    source = resolve_model(model)
    path = quantize_dir(source, dest, scheme)
    before = (source / WEIGHTS).stat().st_size
    after = (path / WEIGHTS).stat().st_size
    err.print(f"{scheme.describe()}: {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB "
              f"({before / after:.1f}x smaller) in {time.perf_counter() - started:.1f} s")
    out.print(str(path), highlight=False)


@app.command("upcycle")
def upcycle_cmd(
    model: str = typer.Argument(..., help="model directory or name (a dense float model)"),
    dest: Path = typer.Argument(..., help="model directory to write"),
    experts: int = typer.Option(..., "--experts", help="experts per layer, each a copy of the layer's MLP"),
    top_k: int = typer.Option(2, "--top-k", help="experts each token uses"),
    seed: int = typer.Option(0, help="seed of the routers' random start"),
):
    """Turn a dense model into a mixture of experts that computes what it did: continue training from it."""
    from .hub import resolve_model
    from .upcycle import upcycle_dir

    started = time.perf_counter()
    path = upcycle_dir(resolve_model(model), dest, experts, top_k, seed=seed)
    err.print(f"{experts} experts, top {top_k}, in {time.perf_counter() - started:.1f} s")
    out.print(str(path), highlight=False)


@app.command("bench")
def bench_cmd(
    model: str = typer.Argument(..., help="model directory or name"),
    vs: Optional[list[str]] = typer.Option(None, "--vs", help="peer to run in the same process: transformers or llama.cpp (repeatable)"),
    new_tokens: int = typer.Option(128, "--tokens", "-n", help="new tokens per decode run"),
    prompt_tokens: int = typer.Option(128, help="prompt length for prefill and time to first token"),
    batch: Optional[list[int]] = typer.Option(None, "--batch", help="batch sizes for aggregate decode speed (repeatable; default 8)"),
    repeats: int = typer.Option(3, help="runs per measurement (the median is reported)"),
    threads: Optional[int] = typer.Option(None, help="torch and llama.cpp threads (default: all cores)"),
    compile: bool = typer.Option(True, help=COMPILE_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON here"),
    explain: bool = typer.Option(False, "--explain", help="say which kernel each layer runs on this CPU and why, then stop"),
):
    """Measure prefill and decode speed, time to first token, memory and size; compare with peers."""
    import json
    import tempfile

    import torch

    from . import bench
    from .checkpoint import read_provenance
    from .convert.gguf_export import export_gguf
    from .hub import resolve_model

    peers = list(vs or [])
    unknown = [p for p in peers if p not in ("transformers", "llama.cpp")]
    if unknown:
        raise ConfigError(f"unknown peer {unknown[0]!r} for --vs; choose transformers or llama.cpp")
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    if explain:
        from .explain import explain as explain_kernels
        from .loading import open_model

        loaded, _ = open_model(str(path))
        loaded.setup_cache(1, 16)  # what decoding sets up: the whole-step kernel's weights are gathered here
        sys.stdout.write("\n".join(explain_kernels(loaded)) + "\n")
        return
    results = []
    with err.status(f"benchmarking {model} ..."):
        results.append(bench.bench_pocketlm(path, new_tokens, prompt_tokens, tuple(batch or [8]), repeats, compile))
    if "transformers" in peers:
        record = read_provenance(path)
        float_dir = Path(record["parent"]) if record.get("quantization") and record.get("parent") else path
        with err.status("benchmarking transformers (float weights) ..."):
            results.append(bench.bench_transformers(float_dir, new_tokens, prompt_tokens, repeats))
    if "llama.cpp" in peers:
        from .tokenizer import Tokenizer

        with tempfile.TemporaryDirectory(prefix="pocketlm-bench-") as tmp, \
                err.status("exporting to GGUF and benchmarking llama.cpp ..."):
            gguf = export_gguf(path, Path(tmp) / "model.gguf")  # the model's own type (int8 -> Q8_0, ...)
            results.append(bench.bench_llama_cpp(gguf, new_tokens, prompt_tokens, repeats, threads,
                                                 tokenizer=Tokenizer.load(path)))
    bandwidth, peak = bench.read_bandwidth_gbs(), bench.integer_peak_gmacs()
    lines = [bench.format_table(results, bandwidth, peak),
             f"memory read bandwidth {bandwidth:.1f} GB/s" + (f"; int8 multiply-add peak {peak:.0f} G/s" if peak else "")
             + f"; {results[0].threads} threads"]
    lines += bench.ratios(results[0], results[1:])
    sys.stdout.write("\n".join(lines) + "\n")  # plain: a Markdown table must not be wrapped to the terminal
    if json_out:
        json_out.write_text(json.dumps({"bandwidth_gbs": bandwidth, "int8_peak_gmacs": peak,
                                        "results": [r.to_dict() for r in results]}, indent=2))


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help="model directory or name"),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="comma-separated: names, NAME=PATH, mmlu_SUBJECT, task.yaml"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="demonstrations per question (default: the task's, mostly 0)"),
    limit: Optional[int] = typer.Option(None, help="only the first N examples of each task"),
    max_tokens: Optional[int] = typer.Option(None, help="perplexity tasks: score only the first N tokens"),
    dtype: Optional[str] = typer.Option(None, help="float32 or bfloat16 (about 2x faster on CPUs with bf16 instructions, slower elsewhere; slightly different scores)"),
    batch_tokens: int = typer.Option(512, help="tokens per scoring batch (padding included)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the results JSON here"),
    log_samples: bool = typer.Option(False, help="include every example's scores and prediction in the JSON"),
    list_tasks: bool = typer.Option(False, "--list-tasks", help="list the built-in tasks and exit"),
    json_schema: Optional[Path] = _constraint_options()["json_schema"],
    regex: Optional[str] = _constraint_options()["regex"],
    grammar: Optional[Path] = _constraint_options()["grammar"],
    choice: Optional[list[str]] = _constraint_options()["choice"],
    index: Optional[Path] = typer.Option(None, "--index", help="generation tasks answer from this index's passages (`pocketlm index build`)"),
    retrieve_k: Optional[int] = typer.Option(None, "--retrieve-k", help="passages per prompt (default: the task's, else 4)"),
    retriever: Optional[str] = typer.Option(None, "--retriever", help="bm25, dense or hybrid (default: the task's, else hybrid)"),
    closed_book: bool = typer.Option(False, "--closed-book", help="turn off a task's own retrieval: the model answers alone"),
):
    """Evaluate a model: multiple choice (acc, acc_norm), generation (exact match, contains), perplexity. A
    constraint option decodes the generation tasks' answers under it (compare with the same run without);
    --index answers them from an index's passages (compare with --closed-book)."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .evaluate.loaders import BUILTIN
    from .evaluate.report import results_table
    from .evaluate.runner import evaluate_dir
    from .hub import resolve_model

    if list_tasks:
        sys.stdout.write("".join(f"{name:14} {about}\n" for name, (_, about) in BUILTIN.items()))
        return
    if not model or not tasks:
        raise ConfigError("give a model and --tasks (see --list-tasks)")
    specs = [t.strip() for t in tasks.split(",") if t.strip()]
    constraint = _constraint(json_schema, regex, grammar, choice)
    retrieval = None
    if index is not None or retrieve_k is not None or retriever is not None:
        from .evaluate.tasks import Retrieval
        from .retrieval.index import Index
        from .retrieval.search import RETRIEVERS

        if closed_book:
            raise ConfigError("--closed-book turns retrieval off; leave out --index, --retrieve-k and --retriever")
        if retriever is not None and retriever not in RETRIEVERS:
            raise ConfigError(f"unknown retriever {retriever!r}; choose from {', '.join(RETRIEVERS)}")
        if retrieve_k is not None and retrieve_k < 1:
            raise ConfigError("--retrieve-k must be 1 or more")
        if index is not None:
            Index.open(index).close()  # a missing index is one line now, before the model loads
        retrieval = Retrieval(str(index) if index else None, retrieve_k, retriever)
    path = resolve_model(model)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        bars: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = bar.add_task(name, total=total)
            bar.update(bars[name], completed=done, total=total)

        document = evaluate_dir(path, specs, dtype=dtype, num_fewshot=num_fewshot, limit=limit, max_tokens=max_tokens,
                                batch_tokens=batch_tokens, progress=progress, log_samples=log_samples,
                                constraint=constraint, retrieval=retrieval, closed_book=closed_book)
    sys.stdout.write(results_table(document) + "\n")
    if output:
        output.write_text(json.dumps(document, indent=2))
        err.print(f"results written to {output}", highlight=False)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    ctx: typer.Context,
    pipeline: Path = typer.Argument(..., help="a pipeline file (see recipes/pipelines/)"),
    force: Optional[list[str]] = typer.Option(None, "--force", help="run this stage (or variant) even if nothing it "
                                              "depends on changed (repeatable)"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="run only this stage (or variant) and the stages "
                                             "it reads, and write no report (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would run and why, and run nothing"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="where the stages' outputs, the lock file and the "
                                             "report go (default: the file's `dir:`, else runs/NAME)"),
):
    """Run a pipeline: every stage whose inputs changed, each as its own command, then the report (report.md,
    report.html); key=value arguments override the file (e.g. stages.eval.limit=50)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .pipeline import check_pipeline, load_pipeline, run_pipeline

    loaded = load_pipeline(pipeline, overrides=list(ctx.args), directory=directory)
    force, only = list(force or []), list(only or [])
    check_pipeline(loaded, force, only)  # a bad setting is one line before the progress display starts
    if dry_run:
        result = run_pipeline(loaded, force=force, dry_run=True, only=only)
        for stage in result.stages:
            err.print(f"{stage.name:24} {stage.status:10} {stage.reason}", highlight=False)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, event: str, info: dict) -> None:
            if event == "start":
                err.print(f"[bold]{name}[/bold]: {info['reason']}", highlight=False)
                if info.get("command"):
                    err.print(f"  [dim]{info['command']}[/dim]", highlight=False, soft_wrap=True)
                tasks[name] = bar.add_task(name)
            elif event == "running" and name in tasks:
                bar.update(tasks[name], description=f"{name}  [dim]{info['line'][:90]}[/dim]")
            elif event == "done":
                if name in tasks:
                    bar.remove_task(tasks.pop(name))
                if info["status"] == "cached":
                    err.print(f"[dim]{name}: unchanged, skipped[/dim]", highlight=False)
                elif "wall_s" in info:
                    err.print(f"[green]{name}[/green]: done in {info['wall_s']:.1f} s, peak memory "
                              f"{info['peak_rss_mb']:.0f} MB", highlight=False)

        result = run_pipeline(loaded, force=force, progress=progress, only=only)
    if result.report is None:  # --only: the stages left out may be out of date, so there is nothing to report
        err.print(f"{len(result.ran)} of {len(result.stages)} stages ran (--only {', '.join(only)}); no report",
                  highlight=False, soft_wrap=True)
        return
    err.print(f"{len(result.ran)} of {len(result.stages)} stages ran; report: {result.report} and "
              f"{result.report.with_suffix('.html')}", highlight=False, soft_wrap=True)
    out.print(str(result.report), highlight=False)


@app.command("merge")
def merge_cmd(
    adapter: Path = typer.Argument(..., help="a PEFT LoRA adapter directory (adapter_config.json naming its base model)"),
    destination: Path = typer.Argument(..., help="the merged model directory to write"),
) -> None:
    """Fold a LoRA adapter into its base model's weights: a plain model directory to export or quantize."""
    from .adapt.adapters import is_adapter_dir, load_adapted, read_adapter_config
    from .checkpoint import save_model_dir

    if not is_adapter_dir(adapter):
        beside = adapter.parent / "adapter"
        if is_adapter_dir(beside):  # `pocketlm train` with a LoRA adapter writes OUT/model merged, OUT/adapter
            raise ConfigError(f"{adapter}: already a merged model (its training run keeps the LoRA adapter in "
                              f"{beside}); use it as it is, or merge {beside}")
        raise ConfigError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    config = read_adapter_config(adapter)
    if config.peft_type != "LORA":
        raise ConfigError(f"{adapter}: a {config.peft_type} adapter has nothing to fold into the weights; only LoRA merges")
    model, tokenizer = load_adapted(adapter, merge=True)
    weights = {k: v.detach().float() for k, v in model.state_dict().items()}
    provenance = {"source": str(adapter), "parent": config.base_model_name_or_path,
                  "adapter": {"path": str(adapter.resolve()), "type": "lora", "r": config.r,
                              "alpha": config.lora_alpha, "merged": True}}
    path = save_model_dir(destination, model.config, weights, tokenizer, provenance=provenance)
    out.print(str(path), highlight=False)


@app.command("split-task")
def split_task_cmd(
    task: str = typer.Argument(..., help="a multiple-choice task: a built-in name (arc_easy), NAME=PATH, or a task file"),
    directory: Path = typer.Argument(..., help="where train.jsonl, test.jsonl, test.yaml and split.json go"),
    test_fraction: float = typer.Option(0.2, help="share of the examples held out for testing"),
    seed: int = typer.Option(0, help="shuffle seed"),
) -> None:
    """Split a task into SFT training data and a held-out test task (never trained on)."""
    from .evaluate.split import split_task

    record = split_task(task, directory, test_fraction, seed)
    out.print(f"{record['task']}: {record['train']} training examples -> {directory / 'train.jsonl'}, "
              f"{record['test']} held out -> {directory / 'test.yaml'}", highlight=False)


@app.command("compare")
def compare_cmd(
    models: list[str] = typer.Argument(..., help="two or more model directories or names"),
    tasks: str = typer.Option(..., "--tasks", "-t", help="comma-separated tasks, as for `pocketlm eval`"),
    out_dir: Path = typer.Option(Path("compare-report"), "--out", "-o", help="folder for report.md, plots and JSON"),
    limit: Optional[int] = typer.Option(None, help="only the first N examples of each task"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="prompt for the side-by-side generations (repeatable)"),
    new_tokens: int = typer.Option(32, help="tokens per side-by-side generation"),
    compile: bool = typer.Option(False, help="compile the decode step before measuring speed"),
    leaderboard: Optional[Path] = typer.Option(None, help="leaderboard JSON to append to (default: OUT/leaderboard.json)"),
):
    """Compare models: task scores, size, load time, speed, memory, and generations, with plots."""
    from .evaluate.compare import compare

    specs = [t.strip() for t in tasks.split(",") if t.strip()]
    with err.status("comparing ...") as status:
        report = compare(models, specs, out_dir, limit=limit, prompts=prompt, new_tokens=new_tokens, compile=compile,
                         leaderboard=leaderboard, progress=lambda m: status.update(f"measuring {m} ..."))
    sys.stdout.write(report.read_text())
    err.print(f"report: {report}", highlight=False)


@app.command("serve")
def serve_cmd(
    models: Optional[list[str]] = typer.Argument(None, help="model directories or names, each served under its name"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="serve.yaml: variants, experiment, limits"),
    host: Optional[str] = typer.Option(None, help="address to bind (default 127.0.0.1: this machine only)"),
    port: Optional[int] = typer.Option(None, help="port (default 8000)"),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help="require this Bearer key (repeatable)"),
    database: Optional[str] = typer.Option(None, "--db", help="request log: a SQLite path or a SQLAlchemy URL"),
    log_prompts: Optional[bool] = typer.Option(None, "--log-prompts/--no-log-prompts", help="store prompt and completion text"),
    max_batch: Optional[int] = typer.Option(None, help="sequences decoded together per model (default 32)"),
    max_context: Optional[int] = typer.Option(None, help="tokens per sequence (default 2048, capped by the model)"),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: all cores)"),
    dtype: Optional[str] = typer.Option(None, help="float32 (default; the numbers `pocketlm eval` gives) or bfloat16 (faster on CPUs with bf16 instructions, slower elsewhere)"),
):
    """Serve models over an OpenAI-compatible HTTP API, with A/B variants, feedback, metrics and a web page."""
    import torch
    import uvicorn

    from .serve.app import create_app
    from .serve.config import load_serve_config

    settings = load_serve_config(config, models or [], host=host, port=port, api_keys=api_key or None,
                                 database=database, log_prompts=log_prompts, max_batch=max_batch,
                                 max_context=max_context, threads=threads, dtype=dtype)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with err.status("loading models ..."):
        server_app = create_app(settings)
    server = server_app.state.server
    names = ", ".join([*server.variants, *(f"{name} (embeddings)" for name in server.library.embedders)])
    err.print(f"serving {names} on http://{settings.host}:{settings.port} (web page at /, API at /v1)", highlight=False,
              soft_wrap=True)
    uvicorn.run(server_app, host=settings.host, port=settings.port, log_level="warning")


ab_app = typer.Typer(help="A/B experiments: reports from the server's request log.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")


@ab_app.command("report")
def ab_report_cmd(
    db: str = typer.Option("pocketlm-serve.db", "--db", help="the server's request log (SQLite path or SQLAlchemy URL)"),
    experiment: Optional[str] = typer.Option(None, help="only this experiment's requests"),
    baseline: Optional[str] = typer.Option(None, help="variant the others are compared with (default: the first)"),
    since: Optional[float] = typer.Option(None, help="only requests after this unix time"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG of latency and thumbs-up rate per variant"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
):
    """Per-variant latency, errors and thumbs-up rate, with significance tests against the baseline."""
    import json

    from .serve.report import ab_report, format_report, plot_report

    report = ab_report(db, experiment=experiment, since=since, baseline=baseline)
    sys.stdout.write(format_report(report) + "\n")
    if plot:
        err.print(f"plot: {plot_report(report, plot)}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, allow_nan=False))
        err.print(f"json: {json_out}", highlight=False)


feedback_app = typer.Typer(help="Users' feedback from the server's request log, as training data.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export_cmd(
    db: str = typer.Option("pocketlm-serve.db", "--db", help="the server's request log (SQLite path or SQLAlchemy URL)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="where sft.jsonl, dpo.jsonl and counts.json go"),
    experiment: Optional[str] = typer.Option(None, help="only this experiment's requests"),
    since: Optional[float] = typer.Option(None, help="only requests after this unix time"),
) -> None:
    """Thumbs-up answers and arena winners as SFT examples; arena winners against losers, and thumbs-up against thumbs-down answers
    to the same prompt, as DPO pairs (needs a server run with log_prompts: true)."""
    from .serve.feedback import export_feedback

    data = export_feedback(db, out_dir, experiment=experiment, since=since)
    c = data.counts
    err.print(f"{c['votes']} votes and {c['arena_votes']} arena votes on {c['requests']} requests -> {c['sft']} SFT "
              f"examples, {c['dpo']} DPO pairs" + (f" ({c['skipped_without_text']} voted answers had no logged text)"
                                                   if c["skipped_without_text"] else ""), highlight=False)
    out.print(str(out_dir), highlight=False)


data_app = typer.Typer(help="Datasets: named public datasets (pull, list), and test collections converted to the "
                       "layouts pocketlm reads.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list_cmd() -> None:
    """The named datasets: `pocketlm data pull NAME`, or `dataset:NAME/FILE` in recipes, pipelines and prepare."""
    from .datasets import describe

    for name, files, size, about in describe():
        sys.stdout.write(f"{name:16} {files:4} files {size / 2**20:8.2f} MB  {about}\n")


@data_app.command("pull")
def data_pull_cmd(name: str = typer.Argument(..., help="a named dataset (`pocketlm data list`)")) -> None:
    """Fetch a named dataset's files from their public URLs into the cache, each checked against its sha256 (a
    partial download resumes; POCKETLM_DATASETS names a local mirror to use instead); print where they are."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from .datasets import dataset_files, pull

    items = dataset_files(name)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=err, transient=True) as bar:
        task = bar.add_task(name, total=sum(item.size for item in items))
        sizes = {item.name: 0 for item in items}

        def progress(file: str, done: int, total: int) -> None:
            sizes[file] = done
            bar.update(task, completed=sum(sizes.values()), description=f"{name}/{file}")

        paths = pull(name, progress)
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    err.print(f"{name}: {len(paths)} files, {sum(item.size for item in items) / 2**20:.2f} MB, sha256 checked",
              highlight=False)
    out.print(str(folder), highlight=False)


@data_app.command("cranfield")
def data_cranfield(
    source: Path = typer.Argument(..., help="a directory with cran.all.1400, cran.qry and cranqrel"),
    destination: Path = typer.Argument(..., help="where the BEIR layout goes (corpus.jsonl, queries.jsonl, qrels/test.tsv)"),
) -> None:
    """Convert the Cranfield collection to BEIR's layout (queries numbered by position, gain = 5 - grade)."""
    from .retrieval.collection import read_cranfield, write_beir

    collection = read_cranfield(source)
    write_beir(collection, destination)
    judgements = sum(len(j) for j in collection.qrels.values())
    sys.stdout.write(f"{destination}: {len(collection.corpus)} documents, {len(collection.queries)} queries, "
                     f"{judgements} judgements\n")


@data_app.command("wikitext-cloze")
def data_wikitext_cloze(
    destination: Path = typer.Argument(..., help="where corpus.jsonl and questions.jsonl go"),
    sources: list[Path] = typer.Option(..., "--articles", help="WikiText files whose articles form the corpus (repeatable)"),
    questions_from: Path = typer.Option(..., "--questions-from", help="the WikiText file the questions are drawn from"),
    per_article: int = typer.Option(4, help="questions per article, at most"),
) -> None:
    """Cloze questions from WikiText articles (a number or name masked out of one sentence), with the
    articles as a corpus to answer them from (construction: pocketlm/retrieval/cloze.py)."""
    from .retrieval.cloze import write_cloze

    made = write_cloze(sources, questions_from, destination, per_article)
    sys.stdout.write(f"{destination}: {made['articles']} articles, {made['questions']} questions\n")


@app.command("eval-retrieval")
def eval_retrieval_cmd(
    dataset: Path = typer.Argument(..., help="a BEIR-layout directory, the Cranfield files' directory, or an index"),
    retriever: list[str] = typer.Option(["bm25"], "--retriever", "-r", help="bm25, dense or hybrid (repeatable)"),
    embedder: Optional[str] = typer.Option(None, help="dense and hybrid: a sentence-transformers directory or name "
                                           "(default all-minilm-l6-v2; an index's own)"),
    queries: Optional[Path] = typer.Option(None, help="with an index: the queries (BEIR queries.jsonl, or id<TAB>text lines)"),
    qrels: Optional[Path] = typer.Option(None, help="with an index: the judgements (TREC qrels or BEIR's tsv)"),
    k: int = typer.Option(100, help="documents retrieved per query"),
    run_dir: Optional[Path] = typer.Option(None, "--runs", help="write each retriever's run (TREC format) here"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the results JSON here"),
) -> None:
    """Score retrievers on a test collection: nDCG@10, recall@10, recall@100, MAP and MRR (trec_eval's)."""
    import json

    from .hub import DEFAULT_EMBEDDER

    from .retrieval.evaluate import evaluate_index, evaluate_retrieval

    if (dataset / "index.sqlite").is_file():
        if queries is None or qrels is None:
            raise ConfigError(f"{dataset} is an index: give its queries and judgements with --queries and --qrels")
        document = evaluate_index(dataset, queries, qrels, retriever, k=k, run_dir=run_dir, embedder=embedder)
    else:
        if queries is not None or qrels is not None:
            raise ConfigError("--queries and --qrels go with an index; a dataset folder has its own")
        document = evaluate_retrieval(dataset, retriever, k=k, run_dir=run_dir, embedder=embedder or DEFAULT_EMBEDDER)
    lines = ["| retriever | nDCG@10 | recall@10 | recall@100 | MAP | MRR | queries | index s | search s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in document["results"].items():
        lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {r['recall@100']:.4f} | {r['map']:.4f} | "
                     f"{r['mrr']:.4f} | {r['queries']} | {r['index_s']:.2f} | {r['search_s']:.2f} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if output:
        output.write_text(json.dumps(document, indent=2))


index_app = typer.Typer(help="Indexes of local documents for retrieval and `pocketlm ask`.", no_args_is_help=True)
app.add_typer(index_app, name="index")
STRICT_HELP = "stop at the first document that cannot be read, instead of naming it and going on"


def _report_update(report) -> None:
    for line in report.skipped:
        err.print(f"skipped: {line}", highlight=False, soft_wrap=True)
    sys.stdout.write(report.summary() + "\n")


@index_app.command("build")
def index_build_cmd(
    documents: list[Path] = typer.Argument(..., help="files and folders (.txt, .md, .html, .pdf, .jsonl)"),
    output: Path = typer.Option(..., "--out", "-o", help="the index folder; rebuilding into it skips unchanged files"),
    embedder: Optional[str] = typer.Option(None, help="a sentence-transformers directory or name (default all-minilm-l6-v2)"),
    chunk_tokens: Optional[int] = typer.Option(None, help="chunk length in the embedder's tokens (default 128)"),
    overlap: Optional[int] = typer.Option(None, help="tokens each chunk repeats of the one before (default 32)"),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
) -> None:
    """Index documents: chunks by tokens, embedded, in SQLite with memory-mapped vectors. Indexed files no
    longer among DOCUMENTS are dropped; unchanged ones are not embedded again."""
    from .retrieval.chunking import Chunking
    from .retrieval.index import Index
    from .retrieval.readers import find_files

    if not find_files(documents):  # before an empty index is made
        raise ConfigError(f"no documents under {', '.join(map(str, documents))} (.txt, .md, .html, .pdf or .jsonl)")
    chunking = None
    if chunk_tokens is not None or overlap is not None:
        chunking = Chunking(chunk_tokens if chunk_tokens is not None else Chunking.tokens,
                            overlap if overlap is not None else Chunking.overlap)
    index = Index.open_or_create(output, embedder, chunking)
    report = index.update(documents, strict=strict, prune=True)
    _report_update(report)
    if not index.stats()["chunks"]:
        raise ConfigError(f"nothing could be indexed: all {len(report.skipped)} documents were unreadable")


@index_app.command("add")
def index_add_cmd(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="an index folder (`pocketlm index build`)"),
    documents: list[Path] = typer.Argument(..., help="files and folders to add or update"),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
) -> None:
    """Add files to an index, or update changed ones, without rebuilding it."""
    from .retrieval.index import Index

    _report_update(Index.open(index_dir).update(documents, strict=strict))


@index_app.command("remove")
def index_remove_cmd(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="an index folder"),
    documents: list[Path] = typer.Argument(..., help="indexed files, or folders whose files to drop"),
) -> None:
    """Drop files from an index."""
    from .retrieval.index import Index

    removed = Index.open(index_dir).remove(documents)
    sys.stdout.write("".join(f"removed {path}\n" for path in removed))


@index_app.command("info")
def index_info_cmd(index_dir: Path = typer.Argument(..., metavar="INDEX", help="an index folder")) -> None:
    """An index's size and provenance (embedder, chunking, pocketlm version) as JSON."""
    import json

    from .retrieval.index import Index

    sys.stdout.write(json.dumps(Index.open(index_dir).stats(), indent=2) + "\n")


@index_app.command("search")
def index_search_cmd(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="an index folder"),
    query: str = typer.Argument(...),
    k: int = typer.Option(5, "-k", help="passages to show"),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help="bm25, dense or hybrid"),
    embedder: Optional[str] = typer.Option(None, help="must be the index's own (default: it)"),
) -> None:
    """The passages an index gives for a query, best first."""
    from .retrieval.index import Index
    from .retrieval.search import Searcher

    for p in Searcher(Index.open(index_dir, embedder), retriever).search(query, k):
        text = " ".join(p.text.split())
        sys.stdout.write(f"[{p.number}] {p.score:.4f} {p.doc_id}, characters {p.start}-{p.end}: "
                         f"{text[:200]}{'...' if len(text) > 200 else ''}\n")


@app.command("ask")
def ask_cmd(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="an index folder (`pocketlm index build`)"),
    model: str = typer.Argument(..., help="an instruction-tuned model directory or name"),
    question: str = typer.Argument(...),
    k: int = typer.Option(4, "-k", help="passages given to the model"),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help="bm25, dense or hybrid"),
    embedder: Optional[str] = typer.Option(None, help="must be the index's own (default: it)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="print the answer, citations and sources as one JSON object"),
    cite: bool = typer.Option(False, "--cite", help="hold the answer to one sentence followed by its citations, [n] "
                                                    "(a grammar; small models seldom cite on their own)"),
) -> None:
    """Answer a question from an index: the top passages, numbered, in the chat template; the answer cites them."""
    import json

    from .retrieval.answer import Answer, format_sources, stream_answer
    from .retrieval.index import Index
    from .retrieval.search import Searcher

    params = _params(max_tokens, temperature, 0, 1.0, 1.0, seed, None)
    with err.status(f"loading {index_dir} and {model} ..."):
        searcher = Searcher(Index.open(index_dir, embedder), retriever)
        lm, tokenizer = _load(model)
    answer = Answer(question)
    for piece in stream_answer(searcher, lm, tokenizer, question, k, params, answer, cite):
        if not json_out:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if json_out:
        sys.stdout.write(json.dumps(answer.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write("\n\nSources:\n" + format_sources(answer) + "\n")


@app.command("drift")
def drift_cmd(
    db: str = typer.Option("pocketlm-serve.db", "--db", help="the server's request log (SQLite path or SQLAlchemy URL)"),
    model: Optional[str] = typer.Option(None, help="model whose tokenizer (and perplexity) to use; needs logged prompts"),
    experiment: Optional[str] = typer.Option(None, help="only this experiment's requests"),
    variant: Optional[str] = typer.Option(None, help="only this variant's requests"),
    recent_fraction: float = typer.Option(0.25, help="the newest fraction of requests is compared with the rest"),
    psi_threshold: float = typer.Option(0.2, help="a PSI above this may flag drift (0.1-0.2 is the usual 'moderate')"),
    alpha: float = typer.Option(0.01, help="...if a permutation test puts the chance of so large a PSI below this"),
    ppl_ratio: float = typer.Option(1.5, help="the model's perplexity, recent over reference, above this flags drift"),
    metrics_file: Optional[Path] = typer.Option(None, help="also write the figures as Prometheus metrics (textfile collector)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
):
    """Compare recent prompts with earlier ones: lengths, tokens (PSI, KL) and the model's perplexity."""
    import json

    from .serve.drift import drift_report, format_drift, write_drift_metrics

    lm = tokenizer = None
    if model:
        lm, tokenizer = _load(model)
    report = drift_report(db, tokenizer, lm, experiment=experiment, variant=variant, recent_fraction=recent_fraction,
                          psi_threshold=psi_threshold, alpha=alpha, ppl_ratio_threshold=ppl_ratio)
    sys.stdout.write(format_drift(report) + "\n")
    if metrics_file:
        err.print(f"metrics: {write_drift_metrics(report, metrics_file)}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, allow_nan=False))
    raise typer.Exit(1 if report["drift"] else 0)


@app.command("info")
def info_cmd(model: str = typer.Argument(..., help="model directory or name")):
    """Show a model directory's shape and provenance."""
    import json

    from .checkpoint import load_config, read_provenance
    from .hub import resolve_model

    path = resolve_model(model)
    config = load_config(path)
    out.print_json(json.dumps({"path": str(path), "config": config.to_hf_dict(), "pocketlm": read_provenance(path)}))


audit_app = typer.Typer(help="Privacy audits: canaries planted in training text, their exposure, and membership inference.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("canaries")
def audit_canaries_cmd(
    source: Path = typer.Argument(..., help="a training text file (documents separated by blank lines)"),
    out_path: Path = typer.Argument(..., help="the copy with canaries planted (its canary file goes beside it: OUT.canaries.json)"),
    count: int = typer.Option(10, "--count", help="canaries per insertion count, and as many controls (never inserted)"),
    repeats: str = typer.Option("1,4,16", "--repeats", help="insertion counts, comma separated"),
    digits: int = typer.Option(6, "--digits", help="digits per secret: 10^digits candidates"),
    seed: int = typer.Option(0, "--seed", help="fixes the secrets and where they go"),
    template: str = typer.Option("my secret code is {secret}", "--template", help="the canary text; {secret} is the digits, space separated"),
):
    """Plant random secrets in a copy of a training text, each as its own document, a given number of times."""
    from .evaluate.privacy_audit import insert_canaries, make_canaries

    try:
        counts = [int(r) for r in repeats.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--repeats {repeats!r}: expected insertion counts such as 1,4,16") from None
    canaries = make_canaries(count, counts, digits, seed, template)
    json_path = insert_canaries(source, canaries, out_path, seed)
    planted = sum(c.repeats for c in canaries)
    err.print(f"{len(canaries)} canaries ({count} per insertion count {sorted(set(counts) | {0})}), {planted} copies "
              f"planted; pocketlm's de-duplication keeps one copy of each: train with data.dedupe=false", highlight=False,
              soft_wrap=True)
    out.print(f"{out_path}\n{json_path}", highlight=False)


@audit_app.command("privacy")
def audit_privacy_cmd(
    model: str = typer.Argument(..., help="model directory or name"),
    canaries: Optional[Path] = typer.Option(None, "--canaries", help="the canary file `pocketlm audit canaries` wrote"),
    members: Optional[Path] = typer.Option(None, "--members", help="text the model was trained on (blank-line separated documents)"),
    non_members: Optional[Path] = typer.Option(None, "--non-members", help="held-out text of the same kind"),
    examples: int = typer.Option(500, "--examples", help="documents drawn from each of --members and --non-members"),
    block_size: int = typer.Option(256, "--block-size", help="tokens per example, as in training"),
    members_head: float = typer.Option(1.0, "--members-head", help="draw members from this first share of the "
                                       "file's documents (a recipe's val_fraction holds out the tail)"),
    non_members_tail: float = typer.Option(1.0, "--non-members-tail", help="draw non-members from this last share "
                                           "of the file's documents (the same file's held-out tail)"),
    samples: Optional[int] = typer.Option(None, "--samples", help="estimate ranks from this many random candidates "
                                          "instead of scoring all 10^digits"),
    seed: int = typer.Option(0, "--seed", help="fixes the examples and sampled candidates drawn"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
):
    """Canary exposure (rank of each planted secret among all candidates) and loss-based membership inference."""
    import json

    from .checkpoint import read_provenance
    from .evaluate.privacy_audit import audit_privacy, format_report
    from .hub import resolve_model

    lm, tokenizer = _load(model)
    with err.status("auditing ..."):
        report = audit_privacy(lm, tokenizer, model, canaries=canaries, members=members, non_members=non_members,
                               examples=examples, block_size=block_size, members_head=members_head,
                               non_members_tail=non_members_tail, samples=samples, seed=seed,
                               provenance=read_provenance(resolve_model(model)))
    sys.stdout.write(format_report(report) + "\n")
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False))
        err.print(f"json: {json_out}", highlight=False)


def main() -> None:
    try:
        app()
    except PocketLMError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
