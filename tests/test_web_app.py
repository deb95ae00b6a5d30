"""The web app in real headless Chromium (Debian's, driven by Playwright): chat a turn, vote, regenerate, complete a
ranking task and a role-play task, and find all of it in the database."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")

CHROMIUM = os.environ.get("FLYWHEEL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium)")
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tokenizer):
    from flywheel.feedback.store import Store
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    root = tmp_path_factory.mktemp("web")
    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(model, tokenizer, root / "model")
    settings = ServeSettings(model=str(root / "model"), db=str(root / "fb.db"), default_max_tokens=12)
    app = create_app(settings)
    store = Store(settings.db)
    with LiveServer(app) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        server.store, server.browser = store, browser
        server.labeler = store.create_user("lena", "labeler")
        server.admin = store.create_user("root", "admin")
        yield server
        browser.close()
    store.close()


def page_with_token(site, path, token=None, *, hold_me=None):
    """A fresh browser page at `path` with `token` stored; `hold_me` (a list): /api/me requests wait in it until the
    test continues them (a busy server), so that a click can come before the page has finished starting."""
    context = site.browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(site.url + "/")
    if token:  # the labeling and admin pages keep a staff token, the chat page its own
        kind = "staff" if path in ("/label", "/admin") else "chat"
        page.evaluate("([k, t]) => localStorage.setItem('flywheel.token.' + k, t)", [kind, token])
    if hold_me is not None:
        page.route("**/api/me", lambda route: hold_me.append(route))
    page.goto(site.url + path)
    page.errors = errors
    return page


def ranking_tasks(site, prompts, k):
    """Ranking tasks made by the admin API (the model samples k answers to each prompt): their ids."""
    r = httpx.post(
        site.url + "/api/admin/tasks",
        headers={"Authorization": f"Bearer {site.admin}"},
        timeout=60,
        json={"kind": "ranking", "prompts": prompts, "k": k, "max_tokens": 8},
    )
    assert r.status_code == 201 and r.json()["created"], r.text
    return r.json()["created"]


def test_chat_turn_vote_regenerate(site):
    from sqlalchemy import select

    from flywheel.feedback.models import Message, Vote

    page = page_with_token(site, "/")
    evil = '<img src=x onerror="window.pwned=1">What is 2+2?'
    page.fill("#input", evil)
    page.click("#send")
    page.wait_for_selector(".msg.assistant .vote-up", timeout=30_000)
    # The user's text is shown as text: no element was created from it, nothing ran.
    assert page.inner_text(".msg.user .content") == evil
    assert page.query_selector(".messages img") is None and page.evaluate("window.pwned") is None
    answer_id = int(page.get_attribute(".msg.assistant", "data-id"))
    # The vote buttons are drawn (inline SVG, no font needed) and named for assistive technology.
    for button, name in ((".vote-up", "good answer"), (".vote-down", "bad answer")):
        assert page.get_attribute(button, "aria-label") == name
        box = page.query_selector(f"{button} svg path").bounding_box()
        assert box is not None and box["width"] > 8 and box["height"] > 8
    page.fill(".vote-comment", "short and right")
    page.click(".vote-up")
    page.wait_for_selector(".vote-up.voted")
    page.click(".regenerate")
    page.wait_for_function(
        f"() => {{ const m = document.querySelector('.msg.assistant');"
        f" return m && m.dataset.id && m.dataset.id !== '{answer_id}'; }}",
        timeout=30_000,
    )
    assert "answer 2 of 2" in page.inner_text(".msg.assistant .meta")
    page.wait_for_selector("#conversations li")
    assert page.inner_text("#conversations li").startswith("<img src=x")
    assert page.errors == []
    version = site.app_version = page.inner_text(".msg.assistant .meta span")
    with site.store.session() as s:
        user = s.scalars(select(Message).where(Message.content == evil)).one()
        answers = s.scalars(select(Message).where(Message.parent_id == user.id).order_by(Message.id)).all()
        assert len(answers) == 2 and all(a.role == "assistant" and a.model_version == version for a in answers)
        vote = s.scalars(select(Vote).where(Vote.message_id == answer_id)).one()
        assert (vote.value, vote.comment) == (1, "short and right")


def test_each_browser_sees_only_its_own_conversations(site):
    """A browser keeps a 256-bit client id (an older, shorter one is replaced) and lists only its own chats."""
    import re

    from flywheel.feedback.store import client_owner

    page = page_with_token(site, "/")
    page.evaluate("() => localStorage.setItem('flywheel.client', 'k-old-short')")
    page.reload()
    page.fill("#input", "Only mine?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .vote-up", timeout=30_000)
    client = page.evaluate("() => localStorage.getItem('flywheel.client')")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", client)
    mine = site.store.list_conversations(client_owner(client))
    assert [c["title"] for c in mine] == ["Only mine?"]
    other = page_with_token(site, "/")  # another browser (a fresh context)
    other.wait_for_load_state("networkidle")
    assert "Only mine?" not in other.inner_text("body")
    assert page.errors == [] and other.errors == []


def test_ranking_task_in_the_browser(site):
    from sqlalchemy import select

    from flywheel.feedback.models import Candidate, RankingLabel

    task_id = ranking_tasks(site, ["Name a capital.", "Count to three."], k=3)[0]
    page = page_with_token(site, "/label", site.labeler)
    page.wait_for_selector("#rank-candidates .candidate")
    ids = [
        int(x)
        for x in page.eval_on_selector_all("#rank-candidates select.rank", "s => s.map(x => x.dataset.candidate)")
    ]
    assert len(ids) == 3
    # The last shown answer is best, the other two tie; the first is flagged unsafe.
    selects = page.query_selector_all("#rank-candidates select.rank")
    selects[0].select_option("2")
    selects[1].select_option("2")
    selects[2].select_option("1")
    page.check(f"input.unsafe[data-candidate='{ids[0]}']")
    page.fill("#rank-comment", "third is clearest")
    page.click("#rank-submit")
    page.wait_for_selector(f"text=Ranking of task {task_id} saved.")
    assert page.errors == []
    with site.store.session() as s:
        row = s.scalars(select(RankingLabel).where(RankingLabel.task_id == task_id)).one()
        pos = {c.id: c.position for c in s.scalars(select(Candidate).where(Candidate.task_id == task_id))}
        assert row.order == [[pos[ids[2]]], sorted([pos[ids[0]], pos[ids[1]]])]
        assert row.unsafe == [pos[ids[0]]] and row.comment == "third is clearest"


def test_a_labeler_skips_a_task_in_the_browser(site):
    """Skip passes a task over with the comment as its reason: the next task is shown, the skipped one is not offered
    to this labeler again but is to others, and the skip is no label."""
    from sqlalchemy import select

    from flywheel.feedback.models import TaskSkip

    assert len(ranking_tasks(site, ["Spell cat.", "Name a river."], k=2)) == 2
    sam = site.store.create_user("sam", "labeler")
    sam_h = {"Authorization": f"Bearer {sam}"}
    page = page_with_token(site, "/label", sam)
    page.wait_for_selector("#rank-candidates .candidate")
    before = httpx.get(site.url + "/api/label/next?kind=ranking", headers=sam_h).json()
    shown, waiting = before["task"]["id"], before["waiting"]
    assert waiting >= 2 and page.inner_text("#rank-waiting") == f"{waiting} tasks waiting for you."
    page.fill("#rank-comment", "not my field")
    page.click("#rank-skip")
    page.wait_for_selector(f"#status:has-text('Task {shown} skipped.')")
    page.wait_for_function("() => document.getElementById('rank-comment').value === ''")  # the next task's form
    assert page.errors == []
    after = httpx.get(site.url + "/api/label/next?kind=ranking", headers=sam_h).json()
    assert after["task"]["id"] != shown and after["waiting"] == waiting - 1
    left = f"{waiting - 1} task"
    page.wait_for_function(f"() => document.getElementById('rank-waiting').textContent.startsWith('{left}')")
    with site.store.session() as s:
        row = s.scalars(select(TaskSkip).where(TaskSkip.task_id == shown)).one()
        assert row.reason == "not my field"
    # Another labeler still gets tasks that sam skipped; bad requests are 4xx, never a label.
    other = site.store.create_user("tia", "labeler")
    assert httpx.post(site.url + "/api/label/skip", json={"task_id": shown}).status_code == 401
    user = site.store.create_user("uma", "user")
    r = httpx.post(site.url + "/api/label/skip", headers={"Authorization": f"Bearer {user}"}, json={"task_id": shown})
    assert r.status_code == 403
    for body, status in (({"task_id": 10**6}, 404), ({"task_id": 0}, 404), ({"task_id": "x"}, 400), ({}, 400)):
        r = httpx.post(site.url + "/api/label/skip", headers={"Authorization": f"Bearer {other}"}, json=body)
        assert r.status_code == status, (body, r.text)
    again = httpx.post(site.url + "/api/label/skip", headers=sam_h, json={"task_id": shown, "reason": "twice"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["skip"]["reason"] == "not my field"
    # The admin page lists the skip with its reason.
    admin_page = page_with_token(site, "/admin", site.admin)
    admin_page.wait_for_selector("#skips tr:has(td:has-text('not my field'))")
    assert admin_page.inner_text("#skips tr:has(td:has-text('not my field'))").split("\t")[:3] == [
        str(shown),
        "ranking",
        "sam",
    ]
    assert admin_page.errors == []


def test_roleplay_task_in_the_browser(site):
    from sqlalchemy import select

    from flywheel.feedback.models import Demonstration

    admin = {"Authorization": f"Bearer {site.admin}"}
    r = httpx.post(
        site.url + "/api/admin/tasks",
        headers=admin,
        json={"kind": "roleplay", "instructions": ["Ask for a capital city."]},
    )
    task_id = r.json()["created"][0]
    # The labeler picks the role-play tab before the page has heard who they are: it stays picked.
    held: list = []
    page = page_with_token(site, "/label", site.labeler, hold_me=held)
    page.click("#tab-roleplay")
    page.wait_for_selector("text=Ask for a capital city.")
    for _ in range(200):
        if held:
            break
        page.wait_for_timeout(25)
    held[0].continue_()
    page.wait_for_selector("#who:has-text('lena')")
    assert page.is_visible("text=Ask for a capital city.")
    page.fill("#rp-user", "What is the capital of France?")
    page.click("#rp-suggest")
    page.wait_for_selector("#status:has-text('Draft from')", timeout=30_000)
    draft = page.input_value("#rp-assistant")
    page.fill("#rp-assistant", "The capital of France is Paris.")
    page.click("#rp-submit")
    page.wait_for_selector("#status:has-text('saved')")
    assert page.errors == []
    with site.store.session() as s:
        demo = s.scalars(select(Demonstration).where(Demonstration.task_id == task_id)).one()
        assert demo.messages == [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
        assert demo.edited and demo.suggestions[0]["turn"] == 1 and demo.suggestions[0]["text"] == draft


def test_admin_page_shows_progress(site):
    page = page_with_token(site, "/admin", site.admin)
    page.wait_for_selector("#labelers td:has-text('lena')")
    row = page.inner_text("#labelers tr:has(td:has-text('lena'))")
    assert "labeler" in row and "\t1\t1\t" in row  # one ranking, one demonstration
    assert "ranking" in page.inner_text("#queue")
    assert page.errors == []
    # Pages refuse to run inline code: a strict CSP is sent with every page.
    assert "default-src 'self'" in httpx.get(site.url + "/label").headers["content-security-policy"]
    # Labeling needs a token.
    assert httpx.get(site.url + "/api/label/next").status_code == 401


def test_a_staff_token_does_not_change_who_the_chat_page_chats_as(site):
    """Entering the admin token on the admin page leaves the chat page's identity alone: it still sends only its
    anonymous client id, and lists that client's conversations."""
    page = page_with_token(site, "/")
    page.fill("#input", "Hello there.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .vote-up", timeout=30_000)
    page.wait_for_selector("#conversations li")
    mine = page.inner_text("#conversations")
    page.goto(site.url + "/admin")
    page.fill("#token", site.admin)
    with page.expect_navigation():  # the page reloads with the token
        page.dispatch_event("#token", "change")
    assert page.evaluate("fw.token()") == site.admin  # the admin page kept it
    page.goto(site.url + "/")
    headers = page.evaluate("fw.headers()")
    assert "Authorization" not in headers and headers["X-Client-Id"]
    page.wait_for_selector("#conversations li")
    assert page.inner_text("#conversations") == mine
    assert page.errors == []


def test_a_draft_for_another_user_turn_is_no_suggestion_and_the_admin_forms_say_what_is_missing(site):
    """Role-play: a draft asked for one user turn and kept after the turn changed is the labeler's text, not a model
    suggestion for that turn. Admin: each task form has its own labelers-per-task, and an empty form is refused in
    the form's words."""
    from sqlalchemy import select

    from flywheel.feedback.models import Demonstration, Task

    page = page_with_token(site, "/label", site.store.create_user("max", "labeler"))
    page.click("#tab-roleplay")
    page.fill("#rp-user", "What is the capital of France?")
    page.click("#rp-suggest")
    page.wait_for_selector("#status:has-text('Draft from')", timeout=30_000)
    page.fill("#rp-user", "How tall is Everest?")
    page.click("#rp-submit")
    page.wait_for_selector("#status:has-text('saved')")
    with site.store.session() as s:
        demo = s.scalars(select(Demonstration).order_by(Demonstration.id.desc())).first()
        assert demo.messages[0]["content"] == "How tall is Everest?" and demo.suggestions == []
    admin = page_with_token(site, "/admin", site.admin)
    admin.wait_for_selector("#queue tr")
    admin.click("#create-roleplay")
    assert "Write at least one instruction" in admin.inner_text("#status")
    admin.fill("#instructions", "Ask about a mountain.")
    admin.fill("#rp-labels-needed", "3")
    admin.fill("#labels-needed", "")  # the ranking form's field: not the role-play form's
    admin.click("#create-roleplay")
    admin.wait_for_selector("#status:has-text('Created 1 role-play tasks')")
    with site.store.session() as s:
        task = s.scalars(select(Task).order_by(Task.id.desc())).first()
        assert task.kind == "roleplay" and task.labels_needed == 3
    admin.click("#create-ranking")
    assert '"labelers per task" must be a whole number' in admin.inner_text("#status")
    assert page.errors == [] and admin.errors == []
