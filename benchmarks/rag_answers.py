"""Answers from documents: SmolLM2-135M-Instruct on cloze questions from WikiText-2 (docs/tasks/
wikitext_cloze.yaml, made by `pocketlm data wikitext-cloze`), closed-book against answering from an index
of the WikiText-2 test and validation articles; and, with the cited variant of the task (the reply must
end in a citation), how often the cited passage holds the answer.

    .venv/bin/python benchmarks/rag_answers.py [--limit N] [--cited-limit 100] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"
TASKS = ROOT / "docs" / "tasks"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--cited-limit", type=int, default=100, help="questions for the cited variant (0: skip it)")
    ap.add_argument("--small-corpus", action="store_true", help="index only the articles of the questions asked (a quick check)")
    ap.add_argument("--work", default="/tmp/pocketlm-rag-bench", help="where the corpus and the index go")
    ap.add_argument("--json")
    args = ap.parse_args()

    from benchmarks.structured import _machine
    from pocketlm.evaluate.runner import evaluate_dir
    from pocketlm.evaluate.tasks import Retrieval
    from pocketlm.hub import resolve_model
    from pocketlm.retrieval.cloze import write_cloze
    from pocketlm.retrieval.index import Index

    work = Path(args.work)
    made = write_cloze([WIKITEXT / "test.txt", WIKITEXT / "valid.txt"], WIKITEXT / "test.txt", work / "corpus")
    shipped = (TASKS / "wikitext_cloze.jsonl").read_text(encoding="utf-8")
    if Path(made["questions_file"]).read_text(encoding="utf-8") != shipped:
        raise SystemExit("docs/tasks/wikitext_cloze.jsonl differs from a fresh construction; regenerate it")
    corpus = Path(made["corpus"])
    if args.small_corpus:
        asked = {json.loads(line)["article"] for line in shipped.splitlines()[:max(args.limit or 0, args.cited_limit)]}
        corpus = work / "small-corpus.jsonl"
        corpus.write_text("".join(line + "\n" for line in Path(made["corpus"]).read_text(encoding="utf-8").splitlines()
                                  if json.loads(line)["_id"] in asked), encoding="utf-8")
    index = Index.open_or_create(work / "index", None, None)
    build = index.update([corpus], prune=True)
    stats = index.stats()
    index.close()
    model = resolve_model(args.model)
    retrieval = Retrieval(str(work / "index"), 4, "hybrid")
    runs = {}
    for name, task, kwargs, limit in (
            ("closed_book", "wikitext_cloze.yaml", {}, args.limit),
            ("retrieval", "wikitext_cloze.yaml", {"retrieval": retrieval}, args.limit),
            ("retrieval_cited", "wikitext_cloze_cited.yaml", {"retrieval": retrieval}, args.cited_limit)):
        if limit == 0:
            continue
        started = time.perf_counter()
        document = evaluate_dir(model, [str(TASKS / task)], limit=limit, **kwargs)
        measured = next(iter(document["results"].values()))
        runs[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()
                      if not k.endswith("_stderr") and k not in ("source", "retrieval")}
        runs[name]["exact_match_stderr"] = round(measured["exact_match_stderr"], 4)
        runs[name]["wall_s"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(runs[name]), flush=True)
    result = {"machine": _machine(), "model": args.model, "questions": made["questions"], "articles": made["articles"],
              "index": {"chunks": stats["chunks"], "embedder": stats["embedder"], "build_s": round(build.seconds, 1),
                        "chunk_tokens": stats["chunk_tokens"], "overlap": stats["chunk_overlap"]},
              "runs": runs}
    if "closed_book" in runs and "retrieval" in runs:
        result["gain_points"] = round(100 * (runs["retrieval"]["exact_match"] - runs["closed_book"]["exact_match"]), 1)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
