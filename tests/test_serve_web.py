"""The web page, driven in a real browser (Debian's Chromium through Playwright) against the real server.

Chat (streamed reply, variant label, thumbs up landing in the request log), an error shown to the user,
the arena (two columns streamed at once, a vote recorded as +1 / -1) and the dashboard's counts.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from helpers import tiny_model_dir
from serve_helpers import running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture
def server_url(tmp_path):
    """The real app with two tiny random models, served by uvicorn on a free port in a thread."""
    from pocketlm.serve.app import create_app
    from pocketlm.serve.config import load_serve_config

    dirs = [tiny_model_dir(tmp_path / "model_a", seed=1), tiny_model_dir(tmp_path / "model_b", seed=2)]
    config = load_serve_config(None, [str(d) for d in dirs], database=str(tmp_path / "log.db"), log_prompts=True)
    with running_server(create_app(config)) as url:
        yield url


@contextmanager
def chromium_page():
    """A page in Chromium with the tests' timeouts, and the list its uncaught errors are collected in."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


def query(db: Path, sql: str, *args) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def test_web_page_chat_arena_dashboard(server_url, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "log.db"
    with chromium_page() as (page, page_errors):
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(server_url + "/")

        # ---- chat: a streamed reply with its variant, then a thumbs up --------------------------------
        expect(page.locator("#chat-model option")).to_have_count(2)
        expect(page.locator("#chat-model")).to_have_value("model_a")
        page.fill("#chat-temperature", "0")  # greedy: the same gibberish every run
        page.fill("#chat-max-tokens", "8")
        page.fill("#chat-input", "Hello there")
        page.click("#chat-send")
        reply = page.locator("[data-testid=assistant-message]").last
        expect(reply).to_have_attribute("data-state", "done")
        assert reply.locator("[data-testid=assistant-text]").text_content().strip()
        expect(reply.locator("[data-testid=variant-label]")).to_have_text("variant: model_a")
        chat_id = reply.get_attribute("data-response-id")
        assert chat_id and chat_id.startswith("chatcmpl-")

        reply.locator("[data-testid=feedback-comment]").fill("nice")
        reply.locator("[data-testid=thumb-up]").click()
        expect(reply.locator("[data-testid=feedback-status]")).to_have_text("feedback recorded (up)")
        rows = query(db, "SELECT f.request_id, f.rating, f.comment, r.variant FROM feedback f "
                         "JOIN requests r ON r.id = f.request_id")
        assert rows == [(chat_id, 1, "nice", "model_a")]

        # a second turn carries the conversation; an error response is shown, not swallowed
        page.fill("#chat-max-tokens", "100000")
        page.fill("#chat-input", "And again")
        page.click("#chat-send")
        expect(page.locator("#chat-error")).to_be_visible()
        expect(page.locator("#chat-error")).to_contain_text("max_tokens")
        expect(page.locator("[data-testid=assistant-message]").last).to_have_attribute("data-state", "error")
        page.click("#chat-new")
        expect(page.locator("[data-testid=assistant-message]")).to_have_count(0)

        # ---- arena: both columns stream, "left is better" is +1 left and -1 right ----------------------
        page.click("#tab-arena")
        expect(page.locator("#arena-left-model")).to_have_value("model_a")
        expect(page.locator("#arena-right-model")).to_have_value("model_b")
        page.fill("#arena-temperature", "0")
        page.fill("#arena-max-tokens", "8")
        page.fill("#arena-prompt", "Tell me a story")
        page.click("#arena-send")
        for side in ("left", "right"):
            expect(page.locator(f"#arena-{side}")).to_have_attribute("data-state", "done")
            assert page.locator(f"#arena-{side}-text").text_content().strip()
        expect(page.locator("#arena-left-variant")).to_contain_text("model_a")
        expect(page.locator("#arena-right-variant")).to_contain_text("model_b")
        left_id = page.get_attribute("#arena-left", "data-response-id")
        right_id = page.get_attribute("#arena-right", "data-response-id")
        assert left_id and right_id and left_id != right_id
        expect(page.locator("#vote-left")).to_be_enabled()
        page.click("#vote-left")
        expect(page.locator("#arena-vote-status")).to_contain_text("vote recorded")
        votes = dict(query(db, "SELECT request_id, rating FROM feedback WHERE request_id IN (?, ?)",
                           left_id, right_id))
        assert votes == {left_id: 1, right_id: -1}
        variants = dict(query(db, "SELECT id, variant FROM requests WHERE id IN (?, ?)", left_id, right_id))
        assert variants == {left_id: "model_a", right_id: "model_b"}
        battles = query(db, "SELECT left_id, right_id, winner FROM arena_votes")
        assert battles == [(left_id, right_id, "left")]  # the pair itself: the leaderboard's and DPO's input
        expect(page.locator("#vote-left")).to_be_disabled()  # one vote per round

        # ---- dashboard: the per-variant counts and the live numbers -----------------------------------
        page.click("#tab-dashboard")
        row_a = page.locator("[data-testid=dash-variant-row][data-variant=model_a]")
        row_b = page.locator("[data-testid=dash-variant-row][data-variant=model_b]")
        logged = dict(query(db, "SELECT variant, COUNT(*) FROM requests GROUP BY variant"))
        assert logged["model_a"] >= 2 and logged["model_b"] >= 1  # the chat reply and the arena's two
        expect(row_a.locator("[data-field=requests]")).to_have_text(str(logged["model_a"]))
        expect(row_b.locator("[data-field=requests]")).to_have_text(str(logged["model_b"]))
        expect(row_a.locator("[data-field=thumbs_up]")).to_have_text("2")  # the chat's thumb and the arena win
        expect(row_b.locator("[data-field=thumbs_down]")).to_have_text("1")
        expect(row_b.locator("[data-field=thumbs_up_rate]")).to_have_text("0.0%")
        expect(page.locator("#dash-comparisons tbody tr")).to_have_count(1)
        expect(page.locator("[data-testid=dash-live-row]")).to_have_count(2)
        # one win of model_a over model_b: first, with a finite rating (one virtual tie keeps it finite)
        expect(page.locator("[data-testid=dash-arena-row]")).to_have_count(2)
        expect(page.locator("[data-testid=dash-arena-row]").first).to_have_attribute("data-variant", "model_a")
        expect(page.locator("#dash-arena-votes")).to_have_text("Bradley-Terry, 1 vote")
        expect(page.locator("#dash-error")).to_be_hidden()

        assert not page_errors, page_errors
        outside = [u for u in requested if not u.startswith(server_url)]
        assert not outside, f"the page fetched from other hosts: {outside}"


@pytest.fixture
def rag_server_url(tmp_path):
    """A variant that answers from an index of a few documents, and a plain one, on a tiny random model."""
    from test_serve_rag import build_index, write_config

    from pocketlm.serve.app import create_app
    from pocketlm.serve.config import load_serve_config

    index = build_index(tmp_path / "rag")
    tiny = tiny_model_dir(tmp_path / "tiny", seed=3, max_position_embeddings=2048)
    config = write_config(tmp_path / "serve.yaml", database=str(tmp_path / "log.db"), max_context=2048, models=[
        {"name": "docs", "model": str(tiny), "index": str(index), "k": 3}, {"name": "plain", "model": str(tiny)}])
    with running_server(create_app(load_serve_config(config))) as url:
        yield url, index


def test_web_page_shows_the_sources_of_an_answer_from_documents(rag_server_url):
    """Under an answer from an index: each passage numbered as the prompt numbered it, its title and document,
    an excerpt, the whole passage on hover and when opened, and which the answer cites; none under a plain one."""
    from playwright.sync_api import expect
    from test_serve_rag import QUESTION, cited_numbers

    from pocketlm.retrieval.index import Index
    from pocketlm.retrieval.search import Searcher

    url, index_dir = rag_server_url
    index = Index.open(index_dir)
    passages = Searcher(index, "hybrid").search(QUESTION, 3)
    index.close()
    with chromium_page() as (page, page_errors):
        page.goto(url + "/")
        # the embedding model the index uses is served too, but is not offered for chat
        expect(page.locator("#chat-model option")).to_have_count(2)
        expect(page.locator("#chat-model option").first).to_have_text("docs (answers from index)")
        page.select_option("#chat-model", "docs")
        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "8")
        page.fill("#chat-input", QUESTION)
        page.click("#chat-send")
        reply = page.locator("[data-testid=assistant-message]").last
        expect(reply).to_have_attribute("data-state", "done")
        answer = reply.locator("[data-testid=assistant-text]").text_content()
        sources = reply.locator("[data-testid=source]")
        expect(sources).to_have_count(len(passages))
        cited = cited_numbers(answer, len(passages))
        expect(reply.locator(".sources-head")).to_have_text(f"Sources ({len(cited)} cited)")
        for i, passage in enumerate(passages):
            item = sources.nth(i)
            assert item.get_attribute("data-number") == str(passage.number)
            assert item.get_attribute("data-doc-id") == passage.doc_id
            assert item.get_attribute("title") == passage.text
            assert item.get_attribute("data-cited") == ("true" if passage.number in cited else "false")
            title = f"{passage.title} · " if passage.title else ""
            expect(item.locator("[data-testid=source-label]")).to_have_text(f"[{passage.number}] {title}{passage.doc_id}")
            flat = " ".join(passage.text.split())
            excerpt = item.locator("[data-testid=source-excerpt]").text_content()
            assert excerpt == (flat if len(flat) <= 140 else flat[:140] + "…")
            expect(item.locator("[data-testid=source-text]")).to_be_hidden()
        sources.first.locator("summary").click()
        expect(sources.first.locator("[data-testid=source-text]")).to_be_visible()
        expect(sources.first.locator("[data-testid=source-text]")).to_have_text(passages[0].text)
        assert passages[0].doc_id == "boiler.md"

        page.select_option("#chat-model", "plain")
        page.fill("#chat-input", "Hello")
        page.click("#chat-send")
        plain = page.locator("[data-testid=assistant-message]").last
        expect(plain).to_have_attribute("data-state", "done")
        expect(plain.locator("[data-testid=sources]")).to_be_hidden()
        expect(plain.locator("[data-testid=source]")).to_have_count(0)
        assert not page_errors, page_errors
