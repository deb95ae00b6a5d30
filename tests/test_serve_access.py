"""Who may see and change what, against a live server: every conversation belongs to its maker (a user's token, or
an anonymous client's secret id); others get 404 for it (ids cannot be probed); API calls with no identity are
logged but readable by admins only; a labeler's submissions are theirs alone. Roles (`user` chats only), revoked and
rotated tokens, and rate limits (per user, per address without a token, rejected tokens per address) with 429 and
`Retry-After`."""

from __future__ import annotations

import json
import secrets

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

CLIENT_A = {"X-Client-Id": "a" * 22 + "-secret-of-A"}
CLIENT_B = {"X-Client-Id": "b" * 22 + "-secret-of-B"}
MSGS = [{"role": "system", "content": "SYSTEM PROMPT OF A"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tokenizer):
    from flywheel.feedback.store import Store
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    root = tmp_path_factory.mktemp("own")
    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(model, tokenizer, root / "model")
    settings = ServeSettings(model=str(root / "model"), db=str(root / "fb.db"), default_max_tokens=4)
    app = create_app(settings)
    with LiveServer(app) as server:
        server.ctx = app.state.ctx
        server.store = Store(settings.db)
        server.admin = {"Authorization": "Bearer " + server.store.create_user("root", "admin")}
        server.lena = {"Authorization": "Bearer " + server.store.create_user("lena", "labeler")}
        server.lars = {"Authorization": "Bearer " + server.store.create_user("lars", "labeler")}
        yield server
        server.store.close()


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def chat(site, headers) -> tuple[int, int]:
    """A conversation with one exchange, made by `headers`: (conversation id, assistant message id)."""
    conv = httpx.post(site.url + "/api/conversations", json={}, headers=headers).json()["id"]
    r = httpx.post(f"{site.url}/api/conversations/{conv}/messages", json={"content": "hi"}, headers=headers)
    done = [e for e in sse(r) if e["type"] == "done"]
    assert r.status_code == 200 and done, r.text
    return conv, done[0]["message"]["id"]


def others_get_404(site, conv: int, answer: int, headers: dict) -> None:
    url = site.url
    assert conv not in [
        c["id"] for c in httpx.get(url + "/api/conversations", headers=headers).json()["conversations"]
    ]
    assert httpx.get(f"{url}/api/conversations/{conv}", headers=headers).status_code == 404
    r = httpx.post(
        f"{url}/api/conversations/{conv}/messages", json={"content": "x", "parent_id": answer}, headers=headers
    )
    assert r.status_code == 404
    assert httpx.post(f"{url}/api/messages/{answer}/regenerate", json={}, headers=headers).status_code == 404
    vote = {"value": -1, "idempotency_key": f"v-{conv}-{answer}"}
    assert httpx.post(f"{url}/api/messages/{answer}/votes", json=vote, headers=headers).status_code == 404
    # nor rename or delete it: the conversation stays as it was
    title = site.store.conversation(conv, "", any_owner=True)["title"]
    assert httpx.patch(f"{url}/api/conversations/{conv}", json={"title": "taken"}, headers=headers).status_code == 404
    assert httpx.delete(f"{url}/api/conversations/{conv}", headers=headers).status_code == 404
    assert site.store.conversation(conv, "", any_owner=True)["title"] == title
    missing = httpx.get(f"{url}/api/conversations/{10**9}", headers=headers).json()["error"]
    other = httpx.get(f"{url}/api/conversations/{conv}", headers=headers).json()["error"]
    assert {**other, "message": ""} == {**missing, "message": ""}  # the same answer as for an id that does not exist


def test_anonymous_clients_see_only_their_own(site):
    conv, answer = chat(site, CLIENT_A)
    mine = httpx.get(site.url + "/api/conversations", headers=CLIENT_A).json()["conversations"]
    assert [c["id"] for c in mine] == [conv]
    assert httpx.get(f"{site.url}/api/conversations/{conv}", headers=CLIENT_A).status_code == 200
    others_get_404(site, conv, answer, CLIENT_B)
    others_get_404(site, conv, answer, site.lena)  # a labeler is nobody special in chat
    vote = {"value": 1, "idempotency_key": "mine"}
    assert httpx.post(f"{site.url}/api/messages/{answer}/votes", json=vote, headers=CLIENT_A).status_code == 200
    r = httpx.post(f"{site.url}/api/messages/{answer}/regenerate", json={}, headers=CLIENT_A)
    assert [e["type"] for e in sse(r)][-1] == "done"


def test_every_answer_carries_the_security_headers(site):
    """Pages, API answers, errors and streamed answers: nosniff and no referrer; pages also a CSP and no framing."""
    page = httpx.get(site.url + "/")
    assert page.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert page.headers["x-frame-options"] == "DENY"
    conv = httpx.post(site.url + "/api/conversations", json={}, headers=CLIENT_A).json()["id"]
    stream = httpx.post(f"{site.url}/api/conversations/{conv}/messages", json={"content": "hi"}, headers=CLIENT_A)
    assert [e for e in sse(stream) if e["type"] == "done"]
    missing = httpx.get(site.url + "/api/conversations/999999", headers=CLIENT_A)
    for r in (page, stream, missing, httpx.get(site.url + "/health")):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert missing.status_code == 404 and "content-security-policy" not in missing.headers


def test_a_stream_that_breaks_does_not_reach_the_client_as_complete(site, monkeypatch):
    """A server-side failure after the answer started streaming cuts the HTTP body off, so the client sees an error,
    never a well-formed answer that just stops."""

    async def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    conv = httpx.post(site.url + "/api/conversations", json={}, headers=CLIENT_A).json()["id"]
    monkeypatch.setattr("flywheel.serve.web_api._store_answer", broken)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{site.url}/api/conversations/{conv}/messages", json={"content": "hi"}, headers=CLIENT_A)
    monkeypatch.undo()
    assert chat(site, CLIENT_A)  # the server goes on answering


def test_chat_needs_an_unguessable_identity(site):
    for headers in ({}, {"X-Client-Id": "short-id"}, {"X-Client-Id": "x" * 21}, {"X-Client-Id": "a" * 30 + "!"}):
        for method, path in (("GET", "/api/conversations"), ("POST", "/api/conversations")):
            r = httpx.request(method, site.url + path, json={} if method == "POST" else None, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_identity", (headers, r.text)


def test_api_calls_without_identity_are_for_admins_only(site):
    from flywheel.feedback.store import UNIDENTIFIED

    body = {"model": "flywheel", "messages": MSGS, "max_tokens": 3}
    r = httpx.post(site.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-anything"})
    assert r.status_code == 200
    logged = [c for c in site.store.all_conversations(source="api") if c["owner"] == UNIDENTIFIED]
    assert logged, "the call is still logged for training"
    conv = logged[0]["id"]
    for headers in (CLIENT_A, CLIENT_B, site.lena, {"X-Client-Id": "x" * 22}):
        listed = httpx.get(site.url + "/api/conversations", headers=headers).json()["conversations"]
        assert conv not in [c["id"] for c in listed]
        r = httpx.get(f"{site.url}/api/conversations/{conv}", headers=headers)
        assert r.status_code == 404 and "SYSTEM PROMPT OF A" not in r.text
    answer = site.store.conversation(conv, "", any_owner=True)["messages"][-1]["id"]
    others_get_404(site, conv, answer, {"X-Client-Id": "x" * 22})
    r = httpx.get(f"{site.url}/api/conversations/{conv}", headers=site.admin)
    assert r.status_code == 200 and r.json()["owner"] == UNIDENTIFIED
    assert r.json()["messages"][0]["content"] == "SYSTEM PROMPT OF A"
    listed = httpx.get(site.url + "/api/admin/conversations?source=api", headers=site.admin).json()["conversations"]
    assert conv in [c["id"] for c in listed]
    assert httpx.get(site.url + "/api/admin/conversations", headers=site.lena).status_code == 403
    # an admin reads, but cannot write into someone else's conversation
    assert httpx.post(f"{site.url}/api/messages/{answer}/regenerate", json={}, headers=site.admin).status_code == 404
    assert httpx.delete(f"{site.url}/api/conversations/{conv}", headers=site.admin).status_code == 404


def test_api_calls_with_a_client_id_belong_to_that_client(site):
    body = {"model": "flywheel", "messages": MSGS, "max_tokens": 3}
    r = httpx.post(site.url + "/v1/chat/completions", json=body, headers=CLIENT_B)
    assert r.status_code == 200
    mine = httpx.get(site.url + "/api/conversations", headers=CLIENT_B).json()["conversations"]
    api = [c for c in mine if c["source"] == "api"]
    assert len(api) == 1
    tree = httpx.get(f"{site.url}/api/conversations/{api[0]['id']}", headers=CLIENT_B).json()
    assert tree["messages"][0]["content"] == "SYSTEM PROMPT OF A" and "owner" not in tree
    answer = tree["messages"][-1]["id"]
    others_get_404(site, api[0]["id"], answer, CLIENT_A)
    # the database keeps a hash of the client's secret id, never the id itself
    owners = {c["owner"] for c in site.store.all_conversations()}
    assert not any(CLIENT_B["X-Client-Id"] in o for o in owners)


def test_users_own_their_conversations_and_labels(site):
    conv, answer = chat(site, site.lena)
    others_get_404(site, conv, answer, site.lars)
    others_get_404(site, conv, answer, CLIENT_A)
    # a labeler's submissions are theirs: the same idempotency key from another labeler is a new, separate row
    task = site.store.create_roleplay_task("Explain tides.", labels_needed=2)
    demo = {
        "task_id": task,
        "messages": [{"role": "user", "content": "tides?"}, {"role": "assistant", "content": "The moon."}],
        "idempotency_key": "same-key",
    }
    r_lena = httpx.post(site.url + "/api/label/demonstrations", json=demo, headers=site.lena).json()
    theirs = {**demo, "messages": [demo["messages"][0], {"role": "assistant", "content": "Gravity."}]}
    r_lars = httpx.post(site.url + "/api/label/demonstrations", json=theirs, headers=site.lars).json()
    assert r_lena["created"] and r_lars["created"]
    assert r_lars["demonstration"]["id"] != r_lena["demonstration"]["id"]
    assert r_lars["demonstration"]["messages"][1]["content"] == "Gravity."  # not lena's row
    again = httpx.post(site.url + "/api/label/demonstrations", json=theirs, headers=site.lars).json()
    assert not again["created"] and again["demonstration"]["id"] == r_lars["demonstration"]["id"]
    stored = {d["id"]: d["messages"][1]["content"] for d in _demos(site)}
    assert stored[r_lena["demonstration"]["id"]] == "The moon."  # lena's work unchanged by lars
    # labelers cannot read each other's work or anyone's conversations through the admin views
    for path in ("/api/admin/overview", "/api/admin/conversations", f"/api/conversations/{conv}"):
        assert httpx.get(site.url + path, headers=site.lars).status_code in (403, 404)


def _demos(site) -> list[dict]:
    from sqlalchemy import select

    from flywheel.feedback.models import Demonstration

    with site.store.session() as s:
        return [{"id": d.id, "messages": d.messages} for d in s.scalars(select(Demonstration))]


@pytest.fixture
def limited(site):
    """The site with --chat-auth and the given limits for one test (restored after)."""
    from flywheel.serve.limits import Limits

    ctx = site.ctx
    saved = ctx.limits, ctx.settings.chat_auth

    def configure(*, chat_auth: bool = True, per_user: int = 0, per_address: int = 0, auth_failures: int = 0):
        ctx.settings.chat_auth = chat_auth
        ctx.limits = Limits.of(per_user, per_address, auth_failures)

    yield configure
    ctx.limits, ctx.settings.chat_auth = saved


def test_user_role_chats_but_does_not_label(site, limited):
    limited(chat_auth=True)
    user = {"Authorization": "Bearer " + site.store.create_user("uma", "user")}
    assert httpx.get(site.url + "/api/me", headers=user).json() == {"name": "uma", "role": "user"}
    conv, answer = chat(site, user)
    assert [c["id"] for c in httpx.get(site.url + "/api/conversations", headers=user).json()["conversations"]] == [
        conv
    ]
    body = {"model": "flywheel", "messages": MSGS, "max_tokens": 3}
    assert httpx.post(site.url + "/v1/chat/completions", json=body, headers=user).status_code == 200
    for path in ("/api/label/next", "/api/admin/overview", "/api/admin/conversations"):
        r = httpx.get(site.url + path, headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role", path
    # with --chat-auth, a client id alone is no identity
    r = httpx.get(site.url + "/api/conversations", headers=CLIENT_A)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_revoked_and_rotated_tokens(site, limited, capsys):
    from flywheel.cli import main

    limited(chat_auth=True)
    old = {"Authorization": "Bearer " + site.store.create_user("rita", "labeler")}
    assert httpx.get(site.url + "/api/me", headers=old).status_code == 200
    assert main(["db", "rotate-token", "rita", "--db", str(site.store.url)]) == 0
    new = {"Authorization": "Bearer " + capsys.readouterr().out.strip()}
    assert httpx.get(site.url + "/api/me", headers=old).status_code == 401  # the old token stops at once
    assert httpx.get(site.url + "/api/me", headers=new).json()["name"] == "rita"
    conv, _ = chat(site, new)
    assert main(["db", "revoke-token", "rita", "--db", str(site.store.url)]) == 0
    for path in ("/api/me", "/api/conversations", f"/api/conversations/{conv}", "/api/label/next"):
        r = httpx.get(site.url + path, headers=new)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert main(["db", "users", "--db", str(site.store.url)]) == 0
    assert "rita\tlabeler\trevoked" in capsys.readouterr().out.splitlines()
    assert main(["db", "revoke-token", "nobody", "--db", str(site.store.url)]) == 2  # one-line error
    rotated = {"Authorization": "Bearer " + site.store.rotate_token("rita")}  # rotating a revoked user re-enables
    assert [c["id"] for c in httpx.get(site.url + "/api/conversations", headers=rotated).json()["conversations"]] == [
        conv
    ]


def test_rate_limit_per_token_answers_429_with_retry_after(site, limited):
    openai = pytest.importorskip("openai")
    limited(chat_auth=True, per_user=3)
    for _ in range(3):
        assert httpx.get(site.url + "/api/me", headers=site.lena).status_code == 200
    r = httpx.get(site.url + "/api/me", headers=site.lena)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.json()["error"]["type"] == "rate_limit_error" and 1 <= int(r.headers["Retry-After"]) <= 20
    assert httpx.get(site.url + "/api/me", headers=site.lars).status_code == 200  # another token: its own budget
    client = openai.OpenAI(base_url=site.url + "/v1", api_key=site.lena["Authorization"][7:], max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=2)


def test_rate_limit_per_address_without_a_token(site, limited):
    limited(chat_auth=False, per_address=2)
    assert httpx.get(site.url + "/api/conversations", headers=CLIENT_A).status_code == 200
    assert httpx.get(site.url + "/api/conversations", headers=CLIENT_B).status_code == 200
    r = httpx.get(site.url + "/api/conversations", headers={"X-Client-Id": "c" * 30})  # a new client id: same address
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert httpx.get(site.url + "/api/conversations", headers=site.lena).status_code == 200  # users: per token


def test_rejected_tokens_are_limited_per_address(site, limited):
    limited(chat_auth=True, auth_failures=3)
    for i in range(3):
        r = httpx.get(site.url + "/api/me", headers={"Authorization": f"Bearer fw-guess-{i}"})
        assert r.status_code == 401
    r = httpx.get(site.url + "/api/me", headers={"Authorization": "Bearer fw-guess-4"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    r = httpx.get(site.url + "/api/me", headers=site.lena)  # even a valid token: the answer must not tell
    assert r.status_code == 429
    # a caller cannot name itself a new address: X-Forwarded-For counts only from a proxy named to the server
    r = httpx.get(site.url + "/api/me", headers={**site.lena, "X-Forwarded-For": "10.1.2.3"})
    assert r.status_code == 429


def test_a_malformed_client_id_is_refused_on_the_api_too(site):
    """An API call that sends an X-Client-Id means to read its calls back: a malformed one would be logged where
    its client could never find it."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=site.url + "/v1", api_key="unused", max_retries=0, default_headers={"X-Client-Id": "short"}
    )
    with pytest.raises(openai.AuthenticationError, match="X-Client-Id must be 22-128"):
        client.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=2)
    plain = openai.OpenAI(base_url=site.url + "/v1", api_key="unused", max_retries=0)
    assert plain.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=2).choices  # no id: answered


def test_a_task_of_one_kind_refuses_the_others_fields(site):
    for body in ({"kind": "ranking", "prompts": ["hi"], "instructions": ["play a user"]},
                 {"kind": "roleplay", "instructions": ["play a user"], "prompts": ["hi"]}):  # fmt: skip
        r = httpx.post(site.url + "/api/admin/tasks", json=body, headers=site.admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kind", r.text


def test_flags_configure_the_limits(tmp_path, model_dir):
    from flywheel.config import parse_config
    from flywheel.errors import UserError
    from flywheel.serve.app import ServeSettings, create_app

    argv = ["--model", str(model_dir), "--db", str(tmp_path / "fb.db"), "--rate-limit", "7"]
    settings = parse_config(ServeSettings, [*argv, "--rate-limit-anonymous", "5", "--auth-failure-limit", "2"], "t")
    limits = create_app(settings).state.ctx.limits
    assert (limits.per_user.capacity, limits.per_address.capacity, limits.auth_failures.capacity) == (7, 5, 2)
    with pytest.raises(UserError, match="rate-limit"):
        parse_config(ServeSettings, [*argv, "--rate-limit", "-1"], "t")


def test_label_rules_over_http(site):
    """labels_needed holds for a task ranked by id (409), one demonstration per labeler and task (409), and a second
    vote on a message replaces the first."""
    site.store.register_model_version("v0", "/m")
    tid = site.store.create_ranking_task(
        [{"role": "user", "content": "2+2?"}], [("4", "v0", "stop"), ("5", "v0", "stop")], labels_needed=1
    )
    cands = [c["id"] for c in site.store.task(tid, 0)["candidates"]]
    body = {"task_id": tid, "order": [[cands[0]], [cands[1]]], "idempotency_key": "r1"}
    assert httpx.post(site.url + "/api/label/rankings", json=body, headers=site.lena).json()["created"]
    r = httpx.post(site.url + "/api/label/rankings", json=body, headers=site.lars)
    assert r.status_code == 409 and "already has the 1 label" in r.json()["error"]["message"]
    play = site.store.create_roleplay_task("Say hi.", labels_needed=5)
    demo = {"task_id": play, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    assert httpx.post(
        site.url + "/api/label/demonstrations", json={**demo, "idempotency_key": "d1"}, headers=site.lena
    )
    r = httpx.post(site.url + "/api/label/demonstrations", json={**demo, "idempotency_key": "d2"}, headers=site.lena)
    assert r.status_code == 409
    conv, answer = chat(site, CLIENT_A)
    url = f"{site.url}/api/messages/{answer}/votes"
    first = httpx.post(url, json={"value": 1, "idempotency_key": "up"}, headers=CLIENT_A).json()
    second = httpx.post(url, json={"value": -1, "comment": "no", "idempotency_key": "down"}, headers=CLIENT_A).json()
    assert second["created"] and second["vote"]["id"] == first["vote"]["id"] and second["vote"]["value"] == -1
    mine = [v for v in _votes(site) if v[0] == answer]
    assert mine == [(answer, -1, "no")]


def _votes(site) -> list[tuple]:
    from sqlalchemy import select

    from flywheel.feedback.models import Vote

    with site.store.session() as s:
        return [(v.message_id, v.value, v.comment) for v in s.scalars(select(Vote))]


def test_a_message_in_anothers_conversation_reads_as_missing_through_parent_id(site):
    """Answering under someone else's message (as `parent_id` in one's own conversation) gets the same 404 as an id
    that does not exist, body and all, in range or beyond it: ids cannot be probed that way either."""
    ann, bob = {"X-Client-Id": secrets.token_hex(20)}, {"X-Client-Id": secrets.token_hex(20)}
    _, anns_answer = chat(site, ann)
    mine = httpx.post(site.url + "/api/conversations", json={}, headers=bob).json()["id"]
    errors = []
    for parent in (anns_answer, 10**9, 10**15):
        r = httpx.post(
            f"{site.url}/api/conversations/{mine}/messages", json={"content": "x", "parent_id": parent}, headers=bob
        )
        assert r.status_code == 404
        errors.append(r.json()["error"])
    assert all(e == {**errors[0], "message": e["message"]} for e in errors) and errors[0]["param"] is None
    assert [e["message"] for e in errors] == [f"no message {p}" for p in (anns_answer, 10**9, 10**15)]


def test_a_turn_the_model_cannot_take_is_refused_before_it_is_stored(site):
    """A turn longer than the model's context would stay unanswered in the conversation (and in the export): 400,
    nothing stored. A logged prompt that long (stored before this check) does not stop the tasks made from the chat
    logs: it is skipped."""
    me = {"X-Client-Id": secrets.token_hex(20)}
    conv = httpx.post(site.url + "/api/conversations", json={}, headers=me).json()["id"]
    r = httpx.post(f"{site.url}/api/conversations/{conv}/messages", json={"content": "word " * 400}, headers=me)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert httpx.get(f"{site.url}/api/conversations/{conv}", headers=me).json()["messages"] == []
    from flywheel.feedback.store import client_owner

    site.store.add_user_turn(conv, client_owner(me["X-Client-Id"]), None, "word " * 400)
    chat(site, me)  # and a prompt the model can take, logged after it
    r = httpx.post(
        site.url + "/api/admin/tasks",
        json={"kind": "ranking", "from_conversations": 2, "k": 2, "max_tokens": 4},
        headers=site.admin,
    )
    assert r.status_code == 201 and r.json()["skipped"] >= 1 and r.json()["created"], r.text
