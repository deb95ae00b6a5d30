"""Who may see and change what, against a live server: every conversation belongs to its maker (a user's token, or
an anonymous client's secret id); others get 404 for it (ids cannot be probed); API calls with no identity are
logged but readable by admins only; a labeler's submissions are theirs alone."""

from __future__ import annotations

import json

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
    with LiveServer(create_app(settings)) as server:
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
