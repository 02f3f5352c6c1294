"""Documents read from local files for an index: plain text, Markdown, HTML, PDF (pypdf) and jsonl.

A file that cannot be read raises `UnreadableDocument` naming it and why; the index builder counts and
skips those, or stops at the first under `--strict`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import ConfigError
from .collection import json_lines

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html",
            ".htm": "html", ".pdf": "pdf", ".jsonl": "jsonl"}


class UnreadableDocument(ConfigError):
    """One file that cannot be read: its path and the reason, in one line."""


@dataclass
class Document:
    doc_id: str  # the file's name under the folder given, or a jsonl record's `_id` / `id`
    title: str
    text: str


def find_files(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """Every file to index under `paths` (files as given, folders walked, hidden entries skipped), each with its
    document id: its path relative to the folder it was found under, or its name when given directly."""
    found: dict[Path, str] = {}
    for given in map(Path, paths):
        if given.is_file():
            found.setdefault(given.resolve(), given.name)
        elif given.is_dir():
            for path in sorted(given.rglob("*")):
                relative = path.relative_to(given)
                if path.is_file() and path.suffix.lower() in SUFFIXES and not any(
                        part.startswith(".") for part in relative.parts):
                    found.setdefault(path.resolve(), relative.as_posix())
        else:
            raise ConfigError(f"{given}: no such file or folder")
    return sorted(found.items(), key=lambda item: item[1])


def read_documents(path: Path, doc_id: str) -> list[Document]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UnreadableDocument(f"{path}: unknown kind of file; index .txt, .md, .html, .pdf or .jsonl")
    if kind == "pdf":
        documents = [Document(doc_id, path.stem, _pdf_text(path))]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UnreadableDocument(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        if kind == "jsonl":
            documents = _jsonl_documents(path, text)
        elif kind == "html":
            documents = [_html_document(text, doc_id, path.stem)]
        elif kind == "markdown":
            heading = re.search(r"^#\s+(.+?)\s*#*\s*$", text, flags=re.M)
            documents = [Document(doc_id, heading.group(1) if heading else path.stem, text)]
        else:
            documents = [Document(doc_id, path.stem, text)]
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise UnreadableDocument(f"{path}: no text in it" + (" (a scanned PDF needs OCR first)" if kind == "pdf" else ""))
    return documents


def _pdf_text(path: Path) -> str:
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about damaged xrefs it recovers from
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise UnreadableDocument(f"{path}: the PDF is encrypted; decrypt it first")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except UnreadableDocument:
        raise
    except Exception as e:  # pypdf raises many kinds on damaged files (PdfReadError, ValueError, KeyError, ...)
        raise UnreadableDocument(f"{path}: not a readable PDF ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def _jsonl_documents(path: Path, text: str) -> list[Document]:
    documents, seen = [], set()
    for number, record in json_lines(path, text.splitlines(), UnreadableDocument):
        if not isinstance(record.get("text"), str):
            raise UnreadableDocument(f"{path}: line {number} has no \"text\" string")
        doc_id = str(record.get("_id", record.get("id", f"{path.name}:{number}")))
        if doc_id in seen:
            raise UnreadableDocument(f"{path}: line {number} repeats the id {doc_id!r}")
        seen.add(doc_id)
        documents.append(Document(doc_id, str(record.get("title") or ""), record["text"]))
    return documents


class _HTMLText(HTMLParser):
    """The visible text of a page (no script, style or head but its title), a line break at each block."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
              "blockquote", "table", "ul", "ol", "header", "footer"}
    HIDDEN = {"script", "style", "head", "noscript", "template"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.title, self.hidden, self.in_title = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        self.in_title = self.in_title or tag == "title"
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        if tag == "title":
            self.in_title = False
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.hidden:
            self.parts.append(data)


def _html_document(html: str, doc_id: str, fallback_title: str) -> Document:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    text = "\n".join(line for line in lines if line)
    return Document(doc_id, " ".join("".join(parser.title).split()) or fallback_title, text)
