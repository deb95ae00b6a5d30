"""The OpenAI-compatible API against a live server on localhost, driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    from flywheel.feedback.store import Store
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    root = tmp_path_factory.mktemp("serve")
    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(model, tokenizer, root / "model")
    settings = ServeSettings(
        model=str(root / "model"), db=str(root / "fb.db"), max_tokens_limit=64, max_body_bytes=20_000, max_n=4
    )
    app = create_app(settings)
    with LiveServer(app) as server:
        server.app = app
        server.store = Store(settings.db)
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-a-user-token", max_retries=0)
        yield server
        server.store.close()


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]


def test_completion_shape_usage_and_logging(served, tokenizer):
    from flywheel.tokenization import render_prompt

    r = served.client.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=12, temperature=0.8)
    version = served.app.state.ctx.worker.model.version
    assert r.object == "chat.completion" and r.model == version and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(render_prompt(tokenizer, MSGS))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    # Logged: the request's turns as a chain, the answer under them with the version that wrote it.
    from sqlalchemy import select

    from flywheel.feedback.models import Message

    with served.store.session() as s:
        answer = s.scalars(select(Message).where(Message.role == "assistant").order_by(Message.id.desc())).first()
        assert answer.content == choice.message.content and answer.model_version == version
        parent = s.get(Message, answer.parent_id)
        assert (parent.role, parent.content) == ("user", "What is 12 + 30?")


def test_greedy_matches_the_engine(served, tokenizer):
    from flywheel.engine import SamplingParams
    from flywheel.tokenization import render_prompt

    r = served.client.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=16, temperature=0)
    engine = served.app.state.ctx.worker.model.engine
    gen = engine.generate([render_prompt(tokenizer, MSGS)], SamplingParams(max_new_tokens=16, temperature=0))
    assert r.choices[0].message.content == tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
    assert r.usage.completion_tokens == len(gen.tokens[0])


def test_seed_reproducible_and_stream_equals_non_stream(served):
    kw = dict(model="flywheel", messages=MSGS, max_tokens=20, temperature=1.0, seed=1234)
    a = served.client.chat.completions.create(**kw).choices[0].message.content
    b = served.client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    pieces, finish, usage = [], None, None
    for chunk in served.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == a
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens >= 1
    assert len([p for p in pieces if p]) > 1  # it really streamed, token by token


def test_n_choices_streaming_and_not(served):
    r = served.client.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=8, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 3 * 8  # every choice's tokens are counted
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in served.client.chat.completions.create(
        model="flywheel", messages=MSGS, max_tokens=8, n=2, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert set(texts) == {0, 1} and set(finishes) == {0, 1}


def test_stop_strings_cut_the_answer(served):
    kw = dict(model="flywheel", messages=MSGS, max_tokens=24, temperature=1.0, seed=5)
    full = served.client.chat.completions.create(**kw).choices[0].message.content
    stop = next(ch for ch in full[3:] if ch != "\ufffd" and ch.strip())
    r = served.client.chat.completions.create(stop=[stop, "never-appears"], **kw)
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in served.client.chat.completions.create(stop=stop, stream=True, **kw)
        if c.choices
    )
    assert streamed == full[: full.index(stop)]


def test_models_endpoint(served):
    ids = [m.id for m in served.client.models.list().data]
    assert ids == ["flywheel", served.app.state.ctx.worker.model.version]


def test_errors_have_openai_shape(served):
    c = served.client
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="flywheel", messages=MSGS, temperature=3)
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=65)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="flywheel", messages=MSGS, n=5)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # a prompt must end with a user turn
        c.chat.completions.create(model="flywheel", messages=MSGS + [{"role": "assistant", "content": "42"}])
    assert "must end with a user message" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # a prompt longer than the model's context
        c.chat.completions.create(model="flywheel", messages=[{"role": "user", "content": "hello world " * 300}])
    assert "context" in err.value.body["message"]
    with pytest.raises(openai.APIStatusError) as err:  # over --max-body-bytes
        c.chat.completions.create(model="flywheel", messages=[{"role": "user", "content": "x" * 30_000}])
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    # Schema errors (what FastAPI would answer with 422) are 400s in OpenAI's shape.
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": "flywheel"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(
        served.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(served.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"] == "not found"


def test_concurrent_requests_share_batches(served):
    worker = served.app.state.ctx.worker
    before = dict(worker.stats)

    def ask(i: int) -> str:
        r = served.client.chat.completions.create(
            model="flywheel", max_tokens=24, temperature=1.0, messages=[{"role": "user", "content": f"count {i}"}]
        )
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(ask, range(16)))
    assert all(r in ("stop", "length") for r in reasons)
    batches = worker.stats["batches"] - before["batches"]
    assert worker.stats["requests"] - before["requests"] == 16
    assert batches < 16 and worker.stats["max_rows"] > 1  # rows of several requests were decoded together


def test_chat_auth_flag_and_cors_off(tmp_path, model_dir):
    from flywheel.feedback.store import Store
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    settings = ServeSettings(model=str(model_dir), db=str(tmp_path / "fb.db"), chat_auth=True)
    with LiveServer(create_app(settings)) as server:
        token = Store(settings.db).create_user("ann", "labeler")
        anon = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            anon.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=4)
        assert err.value.body["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)
        assert ok.chat.completions.create(model="flywheel", messages=MSGS, max_tokens=4).choices
        r = httpx.options(
            server.url + "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers
        assert (
            json.loads(
                httpx.get(server.url + "/api/admin/overview", headers={"Authorization": f"Bearer {token}"}).text
            )["error"]["code"]
            == "insufficient_role"
        )
