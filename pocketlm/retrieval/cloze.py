"""A question set built mechanically from WikiText-2: cloze questions whose answer is a number or a name
masked out of one sentence of an article, with the articles as the documents to answer from.

Construction (deterministic; `pocketlm data wikitext-cloze`):
1. WikiText's files are split into articles at their top-level headings (` = Title = `); its tokenisation
   is undone (` @-@ ` -> `-`, ` @,@ ` -> `,`, ` @.@ ` -> `.`, spaces before punctuation and inside
   brackets removed); section headings become lines of their own.
2. Sentences of 8 to 40 words without `<unk>` are candidates. In each, the answer candidates are numbers
   (digits, with thousands separators or decimals) and names (two or more capitalised words, not at the
   sentence's start) that occur once in the sentence.
3. Per article, up to `per_article` questions: sentences and answers drawn by a random generator seeded
   with the article's id (its title, made unique), so the set does not change between runs or machines. The question is the
   sentence with the answer replaced by `____`; `prefix` is the sentence before the blank and `stop` what
   follows it up to the end of its first word (a punctuation mark, or a space and a word), so a model that
   continues the prefix has written its answer when it writes `stop`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..errors import ConfigError

HEADING = re.compile(r"^ = ([^=].*?) = $")
NUMBER = re.compile(r"(?<![\w.,-])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,-])|(?<![\w.,-])\d+(?:\.\d+)?(?![\w,-]|\.\d)")
NAME = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]+(?: (?:of |de |von |the )?[A-Z][a-z]+)+")
BLANK = "____"


def detokenize(text: str) -> str:
    """WikiText's tokenised text back to ordinary prose."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                 (" : ", ": "), (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")")):
        text = text.replace(a, b)
    text = re.sub(r" ([.,;:!?])$", r"\1", text)
    return re.sub(r" {2,}", " ", text).strip()


def wikitext_articles(path: str | Path) -> list[tuple[str, str]]:
    """(title, text) of each article of a WikiText file (the tokens form: wiki.test.tokens)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such WikiText file")
    articles: list[tuple[str, list[str]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = HEADING.match(line)
        if heading:
            articles.append((detokenize(heading.group(1)), []))
        elif articles and line.strip():
            section = re.fullmatch(r" (?:= )+(.+?)(?: =)+ ", line)
            articles[-1][1].append(detokenize(section.group(1)) if section else detokenize(line))
    if not articles:
        raise ConfigError(f"{path}: no articles (WikiText's ` = Title = ` headings) in it")
    return [(title, "\n\n".join(lines)) for title, lines in articles if lines]


def sentences(text: str) -> list[str]:
    return [s.strip() for paragraph in text.split("\n\n") for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", paragraph)]


def answers(sentence: str) -> list[str]:
    """Numbers and names that occur exactly once in the sentence."""
    found = [m.group(0) for pattern in (NUMBER, NAME) for m in pattern.finditer(sentence)]
    return [a for a in dict.fromkeys(found) if len(re.findall(rf"(?<!\w){re.escape(a)}(?!\w)", sentence)) == 1]


def cloze_questions(articles: list[tuple[str, str]], per_article: int = 4) -> list[dict]:
    """Questions from (article id, text) pairs; each names its article by that id."""
    questions = []
    for title, text in articles:
        candidates = [s for s in sentences(text) if 8 <= len(s.split()) <= 40 and "<unk>" not in s and answers(s)]
        rng = random.Random(title)
        for sentence in rng.sample(candidates, min(per_article, len(candidates))):
            answer = rng.choice(answers(sentence))
            question = re.sub(rf"(?<!\w){re.escape(answer)}(?!\w)", BLANK, sentence, count=1)
            prefix, suffix = question.split(BLANK)
            stop = re.match(r"\s*[^\w\s]|\s*\w+", suffix).group(0) if suffix.strip() else "\n"
            questions.append({"id": f"{title}#{len(questions)}", "article": title, "question": question,
                              "answer": answer, "prefix": prefix.rstrip(), "stop": stop, "sentence": sentence})
    return questions


def write_cloze(sources: list[str | Path], question_source: str | Path, out: str | Path,
                per_article: int = 4) -> dict:
    """corpus.jsonl (every article of `sources`) and questions.jsonl (cloze questions from the articles of
    `question_source`, one of `sources`) under `out`. An article's `_id` is its title, with " (2)", " (3)"
    ... added when an earlier article has the same title (WikiText's `<unk>` makes some titles collide)."""
    out = Path(out)
    corpus: dict[str, tuple[str, str]] = {}  # id -> (title, text)
    ids_of: dict[Path, list[str]] = {}
    for source in sources:
        ids = ids_of.setdefault(Path(source).resolve(), [])
        for title, text in wikitext_articles(source):
            doc_id, n = title, 2
            while doc_id in corpus:
                doc_id, n = f"{title} ({n})", n + 1
            corpus[doc_id] = (title, text)
            ids.append(doc_id)
    if Path(question_source).resolve() not in ids_of:
        raise ConfigError(f"{question_source}: the questions must come from one of the article files, so that the "
                          f"corpus can answer them")
    questions = cloze_questions([(i, corpus[i][1]) for i in ids_of[Path(question_source).resolve()]], per_article)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, (title, text) in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    return {"articles": len(corpus), "questions": len(questions), "corpus": str(out / "corpus.jsonl"),
            "questions_file": str(out / "questions.jsonl")}
