"""Documents cut into passages by tokens, with overlap, each keeping its character offsets in the document.

The tokens are the embedder's own (its fast tokenizer), so a passage fits the window the embedder was trained
on. Boundaries fall between words, never inside one: a window's end moves back to the start of the word it
would cut, and the next window starts `overlap` tokens earlier, also at a word's start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Chunking:
    tokens: int = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs
    overlap: int = 32

    def check(self) -> "Chunking":
        if self.tokens < 8:
            raise ConfigError(f"chunks of {self.tokens} tokens are too small; give --chunk-tokens 8 or more")
        if not 0 <= self.overlap < self.tokens // 2:
            raise ConfigError(f"an overlap of {self.overlap} tokens must be at least 0 and under half a chunk "
                              f"({self.tokens // 2})")
        return self


def untruncated(tokenizer):
    """A copy of a `tokenizers.Tokenizer` that neither truncates nor pads: sentence-transformers' tokenizer
    files often set both (to 128 tokens), which would cut every document to one chunk of padding."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def chunk_spans(text: str, tokenizer, chunking: Chunking) -> list[tuple[int, int]]:
    """(start, end) character offsets of each passage of `text`; `tokenizer` is a `tokenizers.Tokenizer`."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets, words = encoding.offsets, encoding.word_ids
    n = len(offsets)
    if n == 0:
        return []

    def word_start(i: int, floor: int) -> int:
        """The first token of the word token i belongs to, not before floor + 1 (a window always moves)."""
        while i > floor + 1 and words[i] is not None and words[i] == words[i - 1]:
            i -= 1
        return i

    spans, start = [], 0
    while True:
        end = min(start + chunking.tokens, n)
        if end < n:
            end = word_start(end, start)
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == n:
            return spans
        start = word_start(max(end - chunking.overlap, start + 1), start)
