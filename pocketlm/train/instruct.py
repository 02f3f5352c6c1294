"""Instruction and preference data -> token rows with a loss mask.

Instruction records (SFT), one per example, in a .json list or a .jsonl file:
    {"instruction": ..., "input": ..., "output": ...}        Alpaca style ("input" optional)
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": ..., "completion": ...}                       plain text, no template (as an eval task's prompt)

Preference records (DPO), .jsonl or a .json list:
    {"prompt": [messages], "chosen": "..." or [assistant message], "rejected": ...}   chat template
    {"prompt": "...", "chosen": "...", "rejected": "..."}                             plain text, no template

A conversation is rendered with the model's chat template (or the Alpaca prompt for a model without
one) as segments of text, each marked trained or not: only the assistant's replies, with the
template's end-of-turn marker, carry loss. Segments are tokenized one by one so the boundary between
prompt and reply is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..tokenizer import Tokenizer

IGNORE = -100  # label of a position without loss (PyTorch's cross_entropy ignore_index)

ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


# ---------------------------------------------------------------------------------------------
# reading records
# ---------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs from a .json list or a .jsonl file; `where` is file:line for errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; expected JSON or JSON lines") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        records = [(f"{path} item {i + 1}", item) for i, item in enumerate(items)]
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ConfigError(f"{where}: each message needs a role (system, user or assistant) and a string "
                              f"content; got {json.dumps(m)[:80]}")
    return messages


def conversation(record: dict, where: str) -> list[dict]:
    """One instruction record as chat messages."""
    if "messages" in record:
        messages = _check_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: the conversation has no assistant message to learn from")
        return messages
    if "instruction" in record and "output" in record:
        fields = [record["instruction"], record.get("input") or "", record["output"]]
        if not all(isinstance(f, str) for f in fields):
            raise ConfigError(f"{where}: instruction, input and output must be strings")
        user = fields[0] + (f"\n\n{fields[1]}" if fields[1] else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": fields[2]}]
    raise ConfigError(f"{where}: expected Alpaca fields (instruction, input, output), chat 'messages', or prompt and "
                      "completion; "
                      f"the record has {', '.join(record) or 'no fields'}")


def preference(record: dict, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) from one preference record."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ConfigError(f"{where}: a preference record needs prompt, chosen and rejected; "
                          f"missing {', '.join(missing)}")
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, where)
    replies = []
    for key in ("chosen", "rejected"):
        value = record[key]
        if isinstance(value, list):  # [{"role": "assistant", "content": ...}]
            value = _check_messages(value, where)[-1]["content"]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a non-empty string or an assistant message")
        replies.append(value)
    return messages, replies[0], replies[1]


# ---------------------------------------------------------------------------------------------
# rendering and tokenizing
# ---------------------------------------------------------------------------------------------
def prompt_format(tokenizer: Tokenizer, choice: str) -> str:
    if choice == "chat" and not tokenizer.chat_template:
        raise ConfigError("sft.prompt_format chat: the model's tokenizer has no chat template; use alpaca")
    if choice == "auto":
        return "chat" if tokenizer.chat_template else "alpaca"
    return choice


def segments(tokenizer: Tokenizer, messages: list[dict], fmt: str, system: str | None = None,
             train_roles: str = "all") -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces. train_roles 'all' trains every assistant reply,
    'last' only the final one (DPO's response)."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_roles == "last":
        replies = replies[-1:]
    if fmt == "alpaca":
        users = [m for m in messages if m["role"] == "user"]
        if len(users) != 1 or len(replies) != 1 or messages[-1]["role"] != "assistant":
            raise ConfigError("the Alpaca prompt holds one instruction and one response; multi-turn conversations "
                              "need a model with a chat template")
        return _alpaca_segments(tokenizer, users[0]["content"], "", messages[-1]["content"])
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i in replies:
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ConfigError("the chat template does not render a conversation as a prefix of its continuation, "
                              "so replies cannot be told from prompts; use sft.prompt_format: alpaca")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return [(text, trained) for text, trained in pieces if text]


def _alpaca_segments(tokenizer: Tokenizer, instruction: str, context: str, reply: str) -> list[tuple[str, bool]]:
    prompt = ALPACA_PROMPT.format(context=", paired with an input that provides further context" if context else "",
                                  instruction=instruction, input=f"### Input:\n{context}\n\n" if context else "")
    return [(prompt, False), (reply + (tokenizer.eos_token or ""), True)]


def plain_segments(tokenizer: Tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
    """A prompt/completion record: the text as it is, the completion (and EOS) trained."""
    prompt, completion = record["prompt"], record["completion"]
    if not (isinstance(prompt, str) and isinstance(completion, str) and completion):
        raise ConfigError(f"{where}: prompt and completion must be strings, the completion non-empty")
    return [(prompt, False), (completion + (tokenizer.eos_token or ""), True)]


def tokenize_segments(tokenizer: Tokenizer, pieces: list[tuple[str, bool]], fmt: str) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    if fmt != "chat":  # the chat template writes its own BOS; other text gets what encode() adds in front
        lead = tokenizer.encode("", add_special_tokens=True)
        ids += lead
        trained += [False] * len(lead)
    for text, flag in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        trained += [flag] * len(piece)
    return ids, trained


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
@dataclass
class RowsReport:
    examples: int = 0
    truncated: int = 0  # examples longer than a row, cut at the row's end
    dropped: list[str] = field(default_factory=list)  # examples left out, for `drop_reason`
    drop_reason: str = "nothing to learn after truncation"
    rows: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        text = f"{self.examples} examples -> {self.rows} rows, {self.trained_tokens} tokens with loss"
        if self.truncated:
            text += f"; {self.truncated} longer than the row were truncated"
        if self.dropped:
            text += f"; {len(self.dropped)} dropped ({self.drop_reason}, e.g. {self.dropped[0]})"
        return text


def pack_rows(examples: list[tuple[list[int], list[bool], str]], block: int, pad_id: int, packing: bool,
              report: RowsReport) -> dict[str, np.ndarray]:
    """Examples -> rows of block + 1 tokens -> input_ids (N, block) and labels (N, block).

    With packing, whole examples are placed one after another (first fit, in order) until a row is
    full; an example never straddles two rows. Labels hold the next token where it is trained, IGNORE
    elsewhere (prompts, padding)."""
    size = block + 1
    rows: list[tuple[list[int], list[bool]]] = []
    for ids, trained, where in examples:
        report.examples += 1
        if len(ids) > size:
            report.truncated += 1
            ids, trained = ids[:size], trained[:size]
        if not any(trained[1:]):
            report.dropped.append(where)
            continue
        if packing:
            for row in rows:
                if len(row[0]) + len(ids) <= size:
                    row[0].extend(ids)
                    row[1].extend(trained)
                    break
            else:
                rows.append((list(ids), list(trained)))
        else:
            rows.append((list(ids), list(trained)))
    if not rows:
        raise ConfigError("no training example is left to learn from (every reply was empty or cut off); "
                          "raise train.block_size")
    tokens = np.full((len(rows), size), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), size), dtype=bool)
    for i, (ids, trained) in enumerate(rows):
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = trained
    labels = np.where(mask[:, 1:], tokens[:, 1:], IGNORE)
    report.rows = len(rows)
    report.trained_tokens = int(mask[:, 1:].sum())
    return {"input_ids": tokens[:, :-1], "labels": labels}


def sft_rows(paths: list[str], tokenizer: Tokenizer, block: int, fmt: str, system: str | None, packing: bool,
             report: RowsReport) -> dict[str, np.ndarray]:
    fmt = prompt_format(tokenizer, fmt)
    examples = []
    for path in paths:
        for where, record in read_records(path):
            if "prompt" in record and "completion" in record:
                ids, trained = tokenize_segments(tokenizer, plain_segments(tokenizer, record, where), "plain")
            elif fmt == "alpaca" and "instruction" in record:  # its own fields, the input in its own section
                conversation(record, where)  # checks the fields
                pieces = _alpaca_segments(tokenizer, record["instruction"], record.get("input") or "", record["output"])
                ids, trained = tokenize_segments(tokenizer, pieces, fmt)
            else:
                ids, trained = tokenize_segments(tokenizer, segments(tokenizer, conversation(record, where), fmt, system), fmt)
            examples.append((ids, trained, where))
    return pack_rows(examples, block, pad_token(tokenizer), packing, report)


def preference_rows(paths: list[str], tokenizer: Tokenizer, block: int, fmt: str, system: str | None,
                    report: RowsReport) -> dict[str, np.ndarray]:
    """chosen_* and rejected_* rows, one pair per index; pairs that do not fit in a row are dropped."""
    fmt = prompt_format(tokenizer, fmt)
    chosen, rejected = [], []
    for path in paths:
        for where, record in read_records(path):
            messages, good, bad = preference(record, where)
            for reply, out in ((good, chosen), (bad, rejected)):
                if isinstance(record["prompt"], str):  # plain text, as prompt/completion SFT records
                    pieces = plain_segments(tokenizer, {"prompt": record["prompt"], "completion": reply}, where)
                    ids, trained = tokenize_segments(tokenizer, pieces, "plain")
                else:
                    conv = messages + [{"role": "assistant", "content": reply}]
                    ids, trained = tokenize_segments(tokenizer, segments(tokenizer, conv, fmt, system, "last"), fmt)
                out.append((ids, trained, where))
    keep = [i for i in range(len(chosen)) if len(chosen[i][0]) <= block + 1 and len(rejected[i][0]) <= block + 1]
    report.examples = len(chosen)
    kept = set(keep)
    report.dropped = [chosen[i][2] for i in range(len(chosen)) if i not in kept]
    report.drop_reason = "a reply does not fit in train.block_size + 1 tokens"
    if not keep:
        raise ConfigError(f"no preference pair fits in train.block_size {block} tokens; raise it")
    pad = pad_token(tokenizer)
    rows = {}
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        part = pack_rows([side[i] for i in keep], block, pad, packing=False, report=RowsReport())
        rows[f"{name}_input_ids"], rows[f"{name}_labels"] = part["input_ids"], part["labels"]
    report.rows = len(keep)
    report.trained_tokens = int((rows["chosen_labels"] != IGNORE).sum() + (rows["rejected_labels"] != IGNORE).sum())
    return rows


def pad_token(tokenizer: Tokenizer) -> int:
    """Padding is never trained on, so any id will do: pad, else EOS, else 0."""
    for token_id in (tokenizer.token_id(tokenizer.pad_token), tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
