"""Fault isolation of the server: every bad input gets its own 4xx, a bug in one request its own 500, and neither
stops the batch worker (a dead worker is restarted, and /health says so). A seeded fuzz over the chat-completions
request schema ends with a normal request completing."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

OK = {"model": "flywheel", "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 3}


POSTGRES = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL")


def database(kind: str, root) -> str:
    if kind == "sqlite":
        return str(root / "fb.db")
    if not POSTGRES:
        pytest.skip("FLYWHEEL_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    pytest.importorskip("psycopg")
    from sqlalchemy import text

    from flywheel.feedback.db import connect

    engine = connect(POSTGRES)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return POSTGRES


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory, tokenizer):
    from flywheel.feedback.store import Store
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    root = tmp_path_factory.mktemp("faults")
    db = database(request.param, root)
    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(model, tokenizer, root / "model")
    settings = ServeSettings(model=str(root / "model"), db=db, max_tokens_limit=4, default_max_tokens=2, max_n=3)
    app = create_app(settings)
    with LiveServer(app) as server:
        server.app = app
        server.worker = app.state.ctx.worker
        server.store = Store(settings.db)
        server.labeler = server.store.create_user("lab", "labeler")
        # a browser-like anonymous client: the web chat needs an identity (its conversations are its own)
        server.http = httpx.Client(
            base_url=server.url, timeout=30, headers={"x-client-id": "faults-test-client-0123456789"}
        )
        yield server
        server.http.close()
        server.store.close()


def post_raw(served, path: str, body: str | bytes, token: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return served.http.post(path, content=body, headers=headers)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert err["param"] == param
    return err


def assert_healthy(served) -> None:
    r = served.http.post("/v1/chat/completions", json=OK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    health = served.http.get("/health")
    assert health.status_code == 200 and health.json()["engine"]["alive"] is True


SURROGATE = '{"model": "flywheel", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]%s}'


def test_lone_surrogates_are_400_and_the_worker_lives(served):
    for extra in ("", ', "stream": true'):
        err = assert_error(post_raw(served, "/v1/chat/completions", SURROGATE % extra), 400, "messages.0.content")
        assert "lone surrogate" in err["message"]
    parts = '{"model": "flywheel", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
    assert_error(post_raw(served, "/v1/chat/completions", parts), 400, "messages.0.content.0.text")
    suggest = '{"messages": [{"role": "user", "content": "x\\udc00"}]}'
    assert_error(post_raw(served, "/api/label/suggest", suggest, served.labeler), 400, "messages.0.content")
    r = post_raw(served, "/api/conversations", '{"title": "\\ud83d"}')  # half an emoji
    assert_error(r, 400, "title")
    r = post_raw(served, "/v1/chat/completions", '{"model": "flywheel", "logit_bias": {"\\udc80": 1}}')  # in a key
    assert_error(r, 400, "logit_bias.\\udc80 (a key)")
    assert_healthy(served)
    r = served.http.post(
        "/api/label/suggest",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {served.labeler}"},
    )
    assert r.status_code == 200 and isinstance(r.json()["text"], str)


def test_every_bad_input_of_the_report(served):
    big = 2**64
    cases = [  # (path, body, status, param)
        ("/v1/chat/completions", {**OK, "seed": big}, 400, "seed"),
        ("/v1/chat/completions", {**OK, "seed": big, "stream": True}, 400, "seed"),
        ("/v1/chat/completions", {**OK, "seed": -(2**63) - 1}, 400, "seed"),
        ("/v1/chat/completions", {**OK, "stream": "yes"}, 400, "stream"),
        ("/v1/chat/completions", {**OK, "max_tokens": True}, 400, "max_tokens"),
        ("/v1/chat/completions", {**OK, "n": 1.0}, 400, "n"),
        ("/v1/chat/completions", {**OK, "temperature": "0.5"}, 400, "temperature"),
        (
            "/v1/chat/completions",
            {**OK, "messages": [{"role": "user", "content": "a\x00b"}]},
            400,
            "messages.0.content",
        ),
        ("/api/conversations", {"title": "nul\x00"}, 400, "title"),
        ("/api/conversations/99999999999999999999/messages", {"content": "hi"}, 404, None),
        (f"/api/conversations/{2**63}/messages", {"content": "hi"}, 404, None),
        (f"/api/conversations/{2**31}/messages", {"content": "hi"}, 404, None),  # beyond PostgreSQL's INTEGER
        (f"/api/messages/{2**31}/votes", {"value": -1, "idempotency_key": "k"}, 404, None),
        (f"/api/messages/{2**63}/regenerate", {}, 404, None),
        (f"/api/messages/{2**64}/votes", {"value": 1, "idempotency_key": "k"}, 404, None),
    ]
    for path, body, status, param in cases:
        err = assert_error(served.http.post(path, json=body), status, param)
        assert err["message"]
    assert_error(served.http.get(f"/api/conversations/{2**63}"), 404)
    conv = served.http.post("/api/conversations", json={}).json()["id"]
    for parent in (2**31, 2**63, 2**80):
        r = served.http.post(f"/api/conversations/{conv}/messages", json={"content": "hi", "parent_id": parent})
        assert_error(r, 404)  # the answer for any unknown id, on every database
    r = served.http.post(f"/api/conversations/{conv}/messages", json={"content": "nul \x00 here"})
    assert_error(r, 400, "content")
    auth = {"authorization": f"Bearer {served.labeler}"}
    demo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for task in (2**31, 2**63, 2**70):
        r = served.http.post(
            "/api/label/rankings", json={"task_id": task, "order": [[1], [2]], "idempotency_key": "a"}, headers=auth
        )
        assert_error(r, 404)
        r = served.http.post(
            "/api/label/demonstrations", json={"task_id": task, "messages": demo, "idempotency_key": "c"}, headers=auth
        )
        assert_error(r, 404)
    # Bodies that are not JSON, not UTF-8, or nested beyond any parser's depth.
    for raw in (b"{not json", b'{"model": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000, b"\x00"):
        assert_error(post_raw(served, "/v1/chat/completions", raw), 400)
    # Unstorable characters in a path (percent-encoded): the model does not exist.
    for path in ("/v1/models/%ED%A0%80", "/v1/models/a%00b", "/v1/models/%FF"):
        assert_error(served.http.get(path), 404)
    # 405s are the client's error, typed as such, with the methods that are allowed.
    r = served.http.get("/v1/chat/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    for path, allow in (("/api/conversations", "GET, POST"), ("/api/conversations/1", "GET, PATCH, DELETE")):
        assert served.http.put(path).headers["allow"] == allow  # every method of the path, not the first route's
    # What was wrong, said plainly: where the JSON breaks, the field of a part, a body that is no object.
    err = assert_error(post_raw(served, "/v1/chat/completions", b'{"model": "flywheel",}'), 400)
    assert err["message"].startswith("the request body is not valid JSON (at character 21") and err["param"] is None
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    r = served.http.post("/v1/chat/completions", json={**OK, "messages": [{"role": "user", "content": [image]}]})
    assert assert_error(r, 400, "messages.0.content.0.type")["message"].endswith("Input should be 'text'")
    r = served.http.post("/v1/chat/completions", json={**OK, "messages": [{"role": "user", "content": None}]})
    assert_error(r, 400, "messages.0.content")
    assert "JSON object" in assert_error(post_raw(served, "/v1/chat/completions", b'"hello"'), 400)["message"]
    # Web bodies take JSON types as given: a string is no id.
    conv = served.http.post("/api/conversations", json={}).json()["id"]
    r = served.http.post(f"/api/conversations/{conv}/messages", json={"content": "hi", "parent_id": "80"})
    assert_error(r, 400, "parent_id")
    assert_healthy(served)


def test_errors_keep_the_connection_open(served, monkeypatch):
    """A pooled client's next request must not fail after a 4xx or a 500 on the same connection."""
    store = served.app.state.ctx.store

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(store, "list_conversations", broken)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        sock = None
        for method, path, body, status in (
            ("GET", "/api/conversations", None, 500),
            ("GET", "/v1/chat/completions", None, 405),
            ("POST", "/v1/chat/completions", b"{bad", 400),
            ("POST", "/v1/chat/completions", json.dumps({**OK, "seed": 2**64}).encode(), 400),
            ("GET", "/api/conversations", None, 500),
            ("POST", "/v1/chat/completions", json.dumps(OK).encode(), 200),
        ):
            headers = {"content-type": "application/json", "x-client-id": "faults-test-client-0123456789"}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            payload = r.read()
            assert r.status == status, payload
            assert (r.getheader("connection") or "").lower() != "close"
            if status == 500:
                assert json.loads(payload)["error"] == {
                    "message": "internal server error",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            assert sock is None or conn.sock is sock  # the same TCP connection all along
            sock = conn.sock
    finally:
        conn.close()


def test_a_bug_in_one_request_fails_that_request_only(served, monkeypatch):
    """The tokenizer raising (not a UserError) on one prompt: a 500 for it; the requests batched with it finish."""
    from flywheel.serve import worker as worker_mod

    real = worker_mod.render_prompt

    def render(tokenizer, messages):
        if "poison" in messages[-1]["content"]:
            raise TypeError("TextEncodeInput must be Union[...]")
        return real(tokenizer, messages)

    monkeypatch.setattr(worker_mod, "render_prompt", render)
    results: dict[str, httpx.Response] = {}

    def ask(text: str) -> None:
        body = {**OK, "messages": [{"role": "user", "content": text}]}
        results[text] = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)

    threads = [threading.Thread(target=ask, args=(t,)) for t in ("one", "poison", "two", "three")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    err = assert_error(results["poison"], 500)
    assert err["code"] == "generation_failed"
    assert all(results[t].status_code == 200 for t in ("one", "two", "three"))
    monkeypatch.undo()
    assert_healthy(served)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread killed on purpose
def test_a_dead_worker_is_restarted_and_health_says_so(served, monkeypatch):
    worker = served.worker
    before = served.http.get("/health").json()
    assert before["status"] == "ok" and before["model"]["version"] == worker.model.version
    assert before["engine"]["queued_requests"] == 0
    real = worker._join
    calls = {"n": 0}

    def crash(model, batch, group):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the loop")  # caught by the thread: the loop starts again
        if calls["n"] == 2:
            raise SystemExit  # ends the thread itself: the watchdog starts a new one
        return real(model, batch, group)

    monkeypatch.setattr(worker, "_join", crash)
    err = assert_error(served.http.post("/v1/chat/completions", json=OK), 500)
    assert err["code"] == "generation_failed"
    t0 = time.monotonic()
    err = assert_error(served.http.post("/v1/chat/completions", json=OK), 500)
    assert time.monotonic() - t0 < 10  # found by the watchdog, not left waiting
    health = served.http.get("/health").json()
    assert health["engine"]["alive"] is True
    assert health["engine"]["restarts"] == before["engine"]["restarts"] + 2
    assert health["engine"]["last_error"].startswith("RuntimeError at ")  # the type, not the message
    assert_healthy(served)


def test_health_answers_while_database_calls_wait(served, monkeypatch):
    """Database calls run in the event loop's thread pool; a locked or slow database fills it. /health and the
    streams' watchdog do not wait in it: a load balancer must not take a server whose worker is fine for dead."""
    import concurrent.futures

    store = served.app.state.ctx.store
    release, waiting = threading.Event(), []
    real = store.log_exchange

    def slow_log(*args, **kwargs):
        waiting.append(1)
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "log_exchange", slow_log)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = [pool.submit(served.http.post, "/v1/chat/completions", json=OK) for _ in range(12)]
        deadline = time.monotonic() + 30
        while len(waiting) < min(12, (os.cpu_count() or 1) + 4) and time.monotonic() < deadline:
            time.sleep(0.05)  # every thread of the default pool (min(32, cores + 4)) is now held
        try:
            t0 = time.monotonic()
            health = served.http.get("/health", timeout=5)
            took = time.monotonic() - t0
        finally:
            release.set()
        assert health.status_code == 200 and took < 2, took
        assert [a.result().status_code for a in answers] == [200] * 12


def test_generated_nul_characters_are_removed_and_counted(served, monkeypatch):
    from flywheel.engine import Detokenizer

    real = Detokenizer.push
    monkeypatch.setattr(Detokenizer, "push", lambda self, token: real(self, token) + "\x00")
    before = served.worker.stats["nul_removed"]
    r = served.http.post("/v1/chat/completions", json={**OK, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    text = r.json()["choices"][0]["message"]["content"]
    assert "\x00" not in text
    added = served.worker.stats["nul_removed"] - before
    assert 1 <= added <= 4
    from sqlalchemy import select

    from flywheel.feedback.models import Message

    with served.store.session() as s:
        logged = s.scalars(select(Message).where(Message.role == "assistant").order_by(Message.id.desc())).first()
    assert "\x00" not in logged.content and logged.content.strip() == text.strip()


def test_fuzzed_chat_completion_requests(served):
    """Several hundred requests drawn over the request schema (valid and invalid values of every field): none hangs,
    none is a 5xx, every error has OpenAI's shape, and a normal request completes afterwards."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    text = st.text(st.characters(exclude_categories=()), max_size=12)
    junk = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        text,
        st.lists(st.integers(), max_size=2),
        st.dictionaries(text, st.integers(), max_size=2),
    )
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 3]), "text": text})
    content = st.one_of(text, st.lists(part, max_size=2), junk)
    role = st.sampled_from(["system", "user", "assistant", "developer", "tool", "function", "", 1])
    message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}), junk)
    good_messages = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": text}), min_size=1, max_size=1)
    fields = {
        "model": st.one_of(st.just("flywheel"), junk),
        "messages": st.one_of(good_messages, st.lists(message, max_size=3), junk),
        "stream": st.one_of(st.booleans(), junk),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
        "n": st.one_of(st.integers(0, 4), junk),
        "temperature": st.one_of(st.floats(0, 2), junk),
        "top_p": st.one_of(st.floats(0, 1), junk),
        "max_tokens": st.one_of(st.integers(0, 5), junk),
        "max_completion_tokens": st.one_of(st.integers(0, 5), junk),
        "stop": st.one_of(text, st.lists(text, max_size=5), junk),
        "seed": st.one_of(st.integers(-(2**65), 2**65), junk),
        "logprobs": st.one_of(st.booleans(), junk),
        "top_logprobs": st.one_of(st.integers(-1, 25), junk),
        "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f"}}]), junk),
        "response_format": st.one_of(st.sampled_from([{"type": "text"}, {"type": "json_object"}]), junk),
        "presence_penalty": st.one_of(st.floats(-2, 2), junk),
        "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["1", "2"]), st.integers(-100, 100)), junk),
        "user": st.one_of(text, junk),
        "unknown_field": junk,
    }
    required = st.fixed_dictionaries({"model": st.just("flywheel"), "messages": good_messages})
    optional = st.fixed_dictionaries({}, optional=fields)
    request = st.one_of(st.builds(lambda a, b: {**b, **a}, required, optional), optional)
    seen: dict[int, int] = {}

    @hypothesis.settings(
        max_examples=500,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(request)
    def check(body):
        data = json.dumps(body, allow_nan=True)
        with served.http.stream(
            "POST", "/v1/chat/completions", content=data, headers={"content-type": "application/json"}
        ) as r:
            raw = r.read().decode()
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, raw)
        if r.status_code != 200:
            err = json.loads(raw)["error"]
            assert err["type"] == "invalid_request_error" and err["message"], raw
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", raw
            assert all("error" not in json.loads(e) for e in events[:-1]), raw
        else:
            assert json.loads(raw)["object"] == "chat.completion"

    t0 = time.monotonic()
    check()
    assert sum(seen.values()) >= 500 and seen.get(200, 0) >= 20 and seen.get(400, 0) >= 100, seen
    assert time.monotonic() - t0 < 300
    assert_healthy(served)


class Collector:
    """A request's events, as the worker emits them."""

    def __init__(self):
        self.events: list[tuple] = []
        self.finished = threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] in ("end", "error"):
            self.finished.set()

    @property
    def last(self) -> tuple:
        assert self.finished.wait(60), self.events
        return self.events[-1]


def batched(tiny_model, tokenizer, specs, patch=None):
    """Queue requests (content, extra GenRequest fields) before the worker starts, so they form one batch."""
    from flywheel.engine import Engine, SamplingParams
    from flywheel.serve.worker import BatchWorker, GenRequest, ServedModel

    model = ServedModel(Engine(tiny_model.eval(), tokenizer), tokenizer, "v-test", "/nowhere")
    if patch is not None:
        patch(model)
    worker = BatchWorker(model, max_batch=16)
    collectors = []
    for content, extra in specs:
        c = Collector()
        extra = dict(extra)
        params = extra.pop("params", SamplingParams(max_new_tokens=4, temperature=0))
        worker.submit(GenRequest([{"role": "user", "content": content}], params, emit=c, **extra))
        collectors.append(c)
    worker.start()
    try:
        results = [c.last for c in collectors]
    finally:
        worker.stop()
    return worker, collectors, results


def test_requests_with_their_own_settings_and_seeds_join_in_one_prefill(tiny_model, tokenizer):
    """Requests that join together share one prefill whatever their settings, and each still gets the answer it
    gets alone (its own temperature, top-k/p, budget and seed)."""
    from flywheel.engine import SamplingParams

    def text(collector):
        return "".join(e[2] for e in collector.events if e[0] == "delta")

    specs = [
        ("one", {"params": SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)}),
        ("two", {"params": SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5, seed=2)}),
        ("three", {"params": SamplingParams(max_new_tokens=8, temperature=0)}),
        ("four", {"params": SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.8, seed=4)}),
    ]
    worker, collectors, results = batched(tiny_model, tokenizer, specs)
    assert [r[0] for r in results] == ["end"] * 4
    assert worker.stats["batches"] == 1 and worker.stats["requests"] == 4
    for spec, together in zip(specs, collectors, strict=True):
        _, alone, _ = batched(tiny_model, tokenizer, [spec])
        assert text(together) == text(alone[0]), spec[0]


def test_a_failing_prefill_is_retried_one_request_at_a_time(tiny_model, tokenizer):
    from flywheel.tokenization import render_prompt

    poison = render_prompt(tokenizer, [{"role": "user", "content": "poison"}])

    def patch(model):
        real = model.engine.batch

        def batch():
            running = real()
            add = running.add

            def add_or_fail(prompts, params, **kw):
                if poison in prompts:
                    raise RuntimeError("this prompt breaks the forward")
                return add(prompts, params, **kw)

            running.add = add_or_fail
            return running

        model.engine.batch = batch

    worker, _, results = batched(tiny_model, tokenizer, [(t, {}) for t in ("one", "poison", "two")], patch)
    assert [r[0] for r in results] == ["end", "error", "end"]
    assert results[1][1] == 500
    assert worker.stats["batches"] == 2 and worker.stats["requests"] == 2  # the prefill of three failed; each alone


def test_a_bug_while_detokenizing_one_row_fails_only_its_request(tiny_model, tokenizer):
    def patch(model):
        def broken(*args, **kwargs):
            raise ValueError("a bug in the token text")

        model.pieces.entry = broken

    specs = [("one", {}), ("two", {"logprobs": True}), ("three", {"n": 2})]
    worker, collectors, results = batched(tiny_model, tokenizer, specs, patch)
    assert [r[0] for r in results] == ["end", "error", "end"]
    assert results[1][1] == 500 and worker.stats["failed_requests"] == 1
    assert worker.stats["max_rows"] == 4  # decoded together: the failure stayed with its row
    done = [e for e in collectors[2].events if e[0] == "done"]
    assert sorted(e[1] for e in done) == [0, 1]


def test_bad_input_reaching_the_worker_is_a_400(tiny_model, tokenizer):
    """Whatever route a request came by, the worker checks its text and seed itself."""
    from flywheel.engine import SamplingParams

    seeded = {"params": SamplingParams(max_new_tokens=2, temperature=1.0, seed=2**64)}
    specs = [("a\ud800b", {}), ("nul\x00", {}), ("x", seeded), ("fine", {})]
    _, _, results = batched(tiny_model, tokenizer, specs)
    assert [r[:2] for r in results] == [("error", 400), ("error", 400), ("error", 400), ("end",)]
    assert "lone surrogate" in results[0][2] and "NUL" in results[1][2] and "seed" in results[2][2]


def test_fuzzed_web_api_requests(served):
    """The web app's JSON routes get junk in every field (huge and negative numbers, NaN, NUL, surrogates, wrong
    types): never a 5xx, never an error after a 200, and a normal request completes afterwards."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    admin = served.store.create_user(f"fuzz-admin-{served.worker.model.version[-8:]}", "admin")
    auth = {"authorization": f"Bearer {admin}", "content-type": "application/json"}
    conv = served.http.post("/api/conversations", json={}, headers=auth).json()["id"]
    first = served.http.post(f"/api/conversations/{conv}/messages", json={"content": "hi"}, headers=auth)
    assert first.status_code == 200
    big = st.integers(-(2**70), 2**70)
    text = st.text(st.characters(exclude_categories=()), max_size=8)
    junk = st.one_of(
        st.none(),
        st.booleans(),
        big,
        st.floats(allow_nan=True),
        text,
        st.lists(big, max_size=3),
        st.lists(st.lists(big, max_size=2), max_size=3),
    )
    turn = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": st.one_of(text, junk)}
    )
    keys = [
        "content",
        "parent_id",
        "temperature",
        "max_tokens",
        "value",
        "comment",
        "idempotency_key",
        "messages",
        "task_id",
        "order",
        "unsafe",
        "suggestions",
        "title",
        "system",
        "kind",
        "prompts",
        "instructions",
        "k",
        "labels_needed",
    ]
    body = st.dictionaries(st.sampled_from(keys), st.one_of(junk, st.lists(turn, max_size=3)), max_size=6)
    paths = [
        f"/api/conversations/{conv}/messages",
        f"/api/conversations/{conv}",  # PATCH: rename
        "/api/conversations",
        "/api/messages/2/votes",
        "/api/messages/2/regenerate",
        "/api/label/suggest",
        "/api/label/rankings",
        "/api/label/demonstrations",
        "/api/admin/tasks",
    ]
    seen: dict[int, int] = {}

    @hypothesis.settings(
        max_examples=300,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(st.sampled_from(paths), body)
    def check(path, payload):
        method = "PATCH" if path == f"/api/conversations/{conv}" else "POST"
        r = served.http.request(method, path, content=json.dumps(payload), headers=auth)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, payload, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["type"] == "invalid_request_error", r.text
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert '"type": "error"' not in r.text, (path, payload, r.text)

    check()
    assert sum(seen.values()) == 300 and len(seen) >= 3, seen
    assert_healthy(served)


def test_suggest_applies_the_same_message_rules_as_v1(served):
    """/api/label/suggest checks turn order and empty content as /v1 does: 400s, and the worker keeps going."""
    auth = {"authorization": f"Bearer {served.labeler}"}
    bad = [
        [{"role": "assistant", "content": "hi"}],  # not the user's turn to be answered
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],  # two user turns in a row
        [{"role": "user", "content": ""}],  # empty
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # ends with the assistant
    ]
    for messages in bad:
        r = served.http.post("/api/label/suggest", json={"messages": messages}, headers=auth)
        assert r.status_code == 400, (messages, r.text)
    r = served.http.post("/api/label/suggest", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth)
    assert r.status_code == 200 and "text" in r.json()
    assert_healthy(served)


def test_a_suggestion_is_recorded_as_the_workbench_shows_it(served, monkeypatch):
    """A sampled draft may hold CR or CRLF and surrounding blanks; a textarea shows CR as LF and the page trims a turn,
    so /api/label/suggest returns that text: an untouched draft then is not recorded as an edit."""
    from types import SimpleNamespace

    from flywheel.serve import web_api

    class Sampled:
        def __init__(self, *args):
            pass

        async def collect(self, request=None):
            return SimpleNamespace(texts=[" Paris.\r\nIt is\rbig. \n"], version="v1", finish_reasons=["stop"])

    monkeypatch.setattr(web_api, "Run", Sampled)
    auth = {"authorization": f"Bearer {served.labeler}"}
    r = served.http.post("/api/label/suggest", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth)
    assert r.status_code == 200 and r.json()["text"] == "Paris.\nIt is\nbig."


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_short_request_joins_the_running_batch(tiny_model, tokenizer, batching):
    """Continuous batching: a short request sent while a long one decodes joins at the next step and ends first;
    with dynamic batching it waits for the long one to end."""
    from flywheel.engine import Engine, SamplingParams
    from flywheel.serve.worker import BatchWorker, GenRequest, ServedModel

    model = ServedModel(Engine(tiny_model.eval(), tokenizer), tokenizer, "v-test", "/nowhere")
    worker = BatchWorker(model, max_batch=8, batching=batching)
    order: list[str] = []
    started = threading.Event()

    def collector(name: str) -> Collector:
        c = Collector()

        def emit(event):
            if event[0] == "delta":
                started.set()
            if event[0] == "end":
                order.append(name)
            c(event)

        c.emit = emit
        return c

    long, short = collector("long"), collector("short")
    worker.start()
    try:
        params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=1, stop_token_ids=[])
        worker.submit(GenRequest([{"role": "user", "content": "a long story"}], params, emit=long.emit))
        assert started.wait(60)
        params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=2, stop_token_ids=[])
        worker.submit(GenRequest([{"role": "user", "content": "short"}], params, emit=short.emit))
        assert short.last == ("end",) and long.last == ("end",)
    finally:
        worker.stop()
    assert [e[3] for e in long.events if e[0] == "done"] == [200]
    assert [e[3] for e in short.events if e[0] == "done"] == [3]
    if batching == "continuous":
        assert order == ["short", "long"] and worker.stats["max_rows"] == 2
    else:
        assert order == ["long", "short"] and worker.stats["max_rows"] == 1


def test_busy_seconds_times_the_step_in_hand_not_the_load(tiny_model, tokenizer, monkeypatch):
    """/health's busy_seconds tells a stuck worker from a busy one: under a long generation it stays at a step's
    time; a step that never returns makes it grow."""
    from flywheel.engine import Engine, SamplingParams
    from flywheel.engine.loop import DecodeBatch
    from flywheel.serve.worker import BatchWorker, GenRequest, ServedModel

    real, stuck = DecodeBatch.step, threading.Event()

    def step(self):
        time.sleep(0.02)
        while stuck.is_set():
            time.sleep(0.01)
        return real(self)

    monkeypatch.setattr(DecodeBatch, "step", step)
    worker = BatchWorker(ServedModel(Engine(tiny_model.eval(), tokenizer), tokenizer, "v", "/nowhere"), max_batch=4)
    c = Collector()
    worker.start()
    try:
        params = SamplingParams(max_new_tokens=100, temperature=1.0, seed=1, stop_token_ids=[])
        worker.submit(GenRequest([{"role": "user", "content": "a long story"}], params, emit=c))
        t0, readings = time.monotonic(), []
        while time.monotonic() - t0 < 1.0:
            readings.append(worker.health()["busy_seconds"])
            time.sleep(0.02)
        assert not c.finished.is_set() and max(r for r in readings if r is not None) < 0.5, readings
        stuck.set()
        time.sleep(1.0)
        assert worker.health()["busy_seconds"] >= 0.9
        stuck.clear()
        assert c.last == ("end",)
        assert worker.health()["busy_seconds"] is None
    finally:
        stuck.clear()
        worker.stop()
