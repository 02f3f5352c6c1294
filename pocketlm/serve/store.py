"""The request log: one row per request and one per feedback vote, in SQLite by default.

Any SQLAlchemy URL works (`postgresql+psycopg://...`); a bare path is taken as a SQLite file.
Prompt and completion text are stored only when the server is told to (`log_prompts`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    select,
)
from sqlalchemy.engine import Engine

from ..errors import ConfigError

metadata = MetaData()

requests_table = Table(
    "requests", metadata,
    Column("id", String(64), primary_key=True),  # the response id the client saw (chatcmpl-..., cmpl-...)
    Column("created", Float, nullable=False, index=True),  # unix time the request arrived
    Column("experiment", String(128)),
    Column("variant", String(128), nullable=False, index=True),
    Column("model", String(256), nullable=False),
    Column("user", String(256)),
    Column("endpoint", String(32), nullable=False),  # "chat" or "completions"
    Column("status", Integer, nullable=False),  # HTTP status; 499: the client went away, 504: timed out
    Column("error", Text),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),  # time to the first generated token
    Column("prompt_text", Text),  # only with log_prompts
    Column("completion_text", Text),  # only with log_prompts
)

feedback_table = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), ForeignKey("requests.id"), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("rating", Integer, nullable=False),  # +1 thumbs up, -1 thumbs down
    Column("comment", Text),
)

ARENA_OUTCOMES = ("left", "right", "tie", "bad")  # which answer won; tie: both good, bad: both bad

arena_table = Table(
    "arena_votes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created", Float, nullable=False),
    Column("left_id", String(64), ForeignKey("requests.id"), nullable=False, index=True),
    Column("right_id", String(64), ForeignKey("requests.id"), nullable=False, index=True),
    Column("winner", String(8), nullable=False),  # one of ARENA_OUTCOMES
)


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL as given, or a SQLite URL for a file path."""
    text = str(target)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def open_database(target: str | Path) -> Engine:
    """Connect (creating the tables if missing)."""
    url = database_url(target)
    if "://" not in str(target):
        Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, connect_args={"check_same_thread": False} if url.startswith("sqlite") else {})
        metadata.create_all(engine)
    except Exception as exc:  # a bad URL, a missing driver, an unwritable path
        raise ConfigError(f"request log database {url!r} cannot be opened: {exc}") from None
    return engine


@dataclass
class RequestRecord:
    id: str
    variant: str
    model: str
    endpoint: str
    status: int
    experiment: str | None = None
    user: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_text: str | None = None
    completion_text: str | None = None
    created: float = 0.0


class RequestLog:
    def __init__(self, target: str | Path):
        self.engine = open_database(target)

    def add_request(self, record: RequestRecord) -> None:
        row = dict(record.__dict__)
        row["created"] = row["created"] or time.time()
        with self.engine.begin() as conn:
            conn.execute(insert(requests_table).values(**row))

    def add_feedback(self, request_id: str, rating: int, comment: str | None = None) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(insert(feedback_table).values(request_id=request_id, rating=rating,
                                                                comment=comment, created=time.time()))
            return int(result.inserted_primary_key[0])

    def add_arena_vote(self, left_id: str, right_id: str, winner: str) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(insert(arena_table).values(left_id=left_id, right_id=right_id, winner=winner,
                                                             created=time.time()))
            return int(result.inserted_primary_key[0])

    def variant_of(self, request_id: str) -> tuple[str, str | None] | None:
        """(variant, experiment) of a logged request, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(requests_table.c.variant, requests_table.c.experiment)
                               .where(requests_table.c.id == request_id)).first()
        return None if row is None else (row[0], row[1])
