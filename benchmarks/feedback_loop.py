"""The feedback loop, measured: a scripted user who likes short answers votes on a served model's answers; one
feedback-to-DPO round (recipes/pipelines/feedback-loop.yaml) trains a tuned variant from the votes; a new A/B run
serves it beside the current model, the same user votes on held-out prompts, and `pocketlm ab report` gives each
variant's thumbs-up rate and the two-proportion test's p-value.

1. Round 0: `pocketlm serve` with the current model alone (log_prompts: true). Each of --prompts Alpaca
   instructions is asked --samples times (sampled, so the answers differ). The user likes short answers: having
   read them all, it fixes its limit at their median length (or --words), then votes thumbs-up on an answer of at
   most that many words (and more than none) and thumbs-down on a longer one. A prompt with answers on both
   sides makes DPO pairs.
2. `pocketlm run recipes/pipelines/feedback-loop.yaml stages.feedback.db=ROUND0`: feedback export, DPO with a
   LoRA adapter, and the serve stage's A/B experiment (current against tuned).
3. Round 1: `pocketlm serve --config` the experiment the pipeline wrote; --heldout other Alpaca instructions,
   each asked once by its own user (the server assigns the variant); the same user votes.
4. `pocketlm ab report` on round 1's log.

    .venv/bin/python benchmarks/feedback_loop.py [--prompts 80] [--samples 3] [--heldout 160] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

POCKETLM = str(REPO / ".venv" / "bin" / "pocketlm")
PIPELINE = REPO / "recipes" / "pipelines" / "feedback-loop.yaml"
EXPERIMENT = "assistant"


def instructions() -> list[str]:
    from pocketlm.datasets import resolve_data_path

    records = json.loads(resolve_data_path("dataset:alpaca/alpaca_data_1k.json").read_text())
    return [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in records]


class Server:
    """`pocketlm serve --config CONFIG` in a process of its own, until the block ends."""

    def __init__(self, config: Path, port: int, env: dict, log: Path):
        self.args, self.port, self.env, self.log = [POCKETLM, "serve", "--config", str(config), "--port", str(port)], \
            port, env, log

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=self.log.open("w"),
                                        stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"the server stopped: see {self.log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        sys.exit(f"the server did not start in 600 s: see {self.log}")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def ask(client: httpx.Client, prompt: str, user: str, args) -> dict:
    reply = client.post("/v1/chat/completions", json={
        "model": EXPERIMENT, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
        "temperature": args.temperature, "user": user})
    reply.raise_for_status()
    body = reply.json()
    text = body["choices"][0]["message"]["content"]
    return {"id": body["id"], "variant": body["variant"], "words": len(text.split()), "prompt": prompt, "text": text}


def ask_all(url: str, jobs: list[tuple[str, str]], args, words: int | None) -> tuple[list[dict], int]:
    """Every (prompt, user) asked; then the user's votes: thumbs-up for an answer of at most `words` words (None:
    the median length of these answers), thumbs-down for a longer one. Returns the answers and the limit."""
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(lambda job: ask(client, *job, args), jobs))
        if words is None:
            words = int(statistics.median(a["words"] for a in answers))
        for answer in answers:
            answer["up"] = 0 < answer["words"] <= words  # short, but an answer
            client.post("/v1/feedback", json={"id": answer["id"], "rating": "up" if answer["up"] else "down"}
                        ).raise_for_status()
    return answers, words


def round_zero(train: list[str], db: Path, work: Path, env: dict, args) -> tuple[list[dict], int, float]:
    """The current model alone, each instruction asked --samples times, then voted on."""
    db.unlink(missing_ok=True)
    config = work / "round0.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": {"name": EXPERIMENT, "variants": [{"name": "current", "model": "smollm2-135m-instruct"}]},
        "database": str(db), "log_prompts": True}))
    started = time.perf_counter()
    with Server(config, args.port, env, work / "round0.log") as url:
        jobs = [(prompt, f"user-{i}-{s}") for i, prompt in enumerate(train) for s in range(args.samples)]
        answers, words = ask_all(url, jobs, args, args.words)
    return answers, words, time.perf_counter() - started


def logged_answers(db: Path) -> list[dict]:
    """Round 0's answers and votes as the server logged them."""
    from pocketlm.serve.report import connect, latest_votes, load_requests

    engine = connect(db)
    rows = load_requests(engine, EXPERIMENT)
    votes = latest_votes(engine, {r["id"] for r in rows})
    return [{"id": r["id"], "variant": r["variant"], "words": len((r["completion_text"] or "").split()),
             "up": votes.get(r["id"]) == 1} for r in rows]


def summary(results: list[dict]) -> dict[str, dict]:
    out = {}
    for variant in sorted({r["variant"] for r in results}):
        mine = [r for r in results if r["variant"] == variant]
        out[variant] = {"answers": len(mine), "thumbs_up": sum(r["up"] for r in mine),
                        "thumbs_up_rate": round(sum(r["up"] for r in mine) / len(mine), 4),
                        "mean_words": round(sum(r["words"] for r in mine) / len(mine), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=80, help="Alpaca instructions asked in round 0")
    parser.add_argument("--samples", type=int, default=3, help="answers per instruction in round 0")
    parser.add_argument("--heldout", type=int, default=160, help="other instructions asked in round 1")
    parser.add_argument("--words", type=int, help="the longest answer the user likes, in words (default: the "
                        "median length of round 0's answers)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "feedback-loop-bench")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for the pipeline (stages.tuned.set.train.max_steps=2 for a quick look)")
    parser.add_argument("--reuse-round0", action="store_true", help="keep round 0's log in --work (with --words, "
                        "the limit it was voted with) and start at the pipeline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.reuse_round0 and args.words is None:
        parser.error("--reuse-round0 needs --words, the limit round 0 was voted with")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.setdefault("POCKETLM_DATASETS", str(REPO.parent / "shared" / "data"))
    os.environ.setdefault("POCKETLM_DATASETS", env["POCKETLM_DATASETS"])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    texts = instructions()
    train, heldout = texts[: args.prompts], texts[500: 500 + args.heldout]  # disjoint: round 1 asks new questions
    round0_db, round1_db = work / "round0.db", work / "round1.db"
    round1_db.unlink(missing_ok=True)
    if args.reuse_round0:
        if not round0_db.is_file():
            sys.exit(f"--reuse-round0: no round 0 log at {round0_db}; run once without it first")
        round0, words, round0_s = logged_answers(round0_db), args.words, 0.0
    else:
        round0, words, round0_s = round_zero(train, round0_db, work, env, args)
    print(f"round 0: {len(round0)} answers in {round0_s:.0f} s; the user likes answers of at most {words} words: "
          f"{summary(round0)}", flush=True)

    started = time.perf_counter()
    done = subprocess.run([POCKETLM, "run", str(PIPELINE), "--dir", str(work / "pipeline"),
                           f"stages.feedback.db={round0_db}", f"stages.serve.database={round1_db}", *args.set],
                          cwd=REPO, env=env)
    if done.returncode != 0:
        sys.exit("the feedback-loop pipeline failed")
    pipeline_s = time.perf_counter() - started
    lock = json.loads((work / "pipeline" / "pipeline.lock").read_text())["stages"]
    feedback = lock["feedback"]["metrics"]
    print(f"feedback-to-DPO round: {pipeline_s:.0f} s; {feedback}", flush=True)

    started = time.perf_counter()
    with Server(work / "pipeline" / "serve" / "serve.yaml", args.port, env, work / "round1.log") as url:
        round1, _ = ask_all(url, [(prompt, f"heldout-{i}") for i, prompt in enumerate(heldout)], args, words)
    round1_s = time.perf_counter() - started
    print(f"round 1: {len(round1)} answers in {round1_s:.0f} s: {summary(round1)}", flush=True)
    for variant in ("current", "tuned"):  # what the votes were on: short answers, or short nonsense?
        for answer in [a for a in round1 if a["variant"] == variant][:3]:
            print(f"  {variant}: {answer['prompt'][:60]!r} -> {answer['text'][:160]!r}")

    report_path = work / "ab.json"
    done = subprocess.run([POCKETLM, "ab", "report", "--db", str(round1_db), "--experiment", EXPERIMENT,
                           "--baseline", "current", "--json", str(report_path)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pocketlm ab report failed: {done.stderr[-2000:]}")
    print(done.stdout)
    (work / "ab.txt").write_text(done.stdout)  # the output docs/pipeline.md quotes
    ab = json.loads(report_path.read_text())
    test = next(c for c in ab["comparisons"] if c["variant"] == "tuned")["thumbs_up_rate"]
    rates = {name: v["thumbs_up_rate"] for name, v in ab["variants"].items()}
    print(f"thumbs-up rate: tuned {rates['tuned']:.1%} vs current {rates['current']:.1%}, p = {test['p']:.2g}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(), "pipeline": str(PIPELINE.relative_to(REPO)), "words": words,
            "round0": {"answers": len(round0), "seconds": round(round0_s, 1), "variants": summary(round0)},
            "feedback": feedback, "pipeline_s": round(pipeline_s, 1),
            "stage_wall_s": {n: e["wall_s"] for n, e in lock.items()},
            "tuned_metrics": lock["tuned"]["metrics"],
            "round1": {"answers": len(round1), "seconds": round(round1_s, 1), "variants": summary(round1),
                       "answers_text": [{k: a[k] for k in ("variant", "prompt", "text", "up")} for a in round1]},
            "thumbs_up_rate": rates, "p_value": test["p"]}, indent=2))


if __name__ == "__main__":
    main()
