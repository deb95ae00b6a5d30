"""The loop closed end to end with tiny models: serve -> label through the API -> export -> `flywheel round`
(SFT -> RM -> PPO) -> the running server switches to the new version without a restart, and every logged answer
keeps the version that wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.mark.slow
def test_round_trains_on_the_export_and_redeploys(tmp_path, model_dir, monkeypatch):
    from sqlalchemy import select

    from flywheel.errors import UserError
    from flywheel.feedback.export import ExportConfig, export
    from flywheel.feedback.models import Message, ModelVersion
    from flywheel.feedback.store import Store
    from flywheel.round import RoundConfig, run_round
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    db = str(tmp_path / "fb.db")
    app = create_app(ServeSettings(model=str(model_dir), db=db, default_max_tokens=8))
    store = Store(db)
    admin = store.create_user("admin", "admin")
    labelers = {name: store.create_user(name, "labeler") for name in ("ann", "ben")}
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="anon", max_retries=0)
        chat = [{"role": "user", "content": "What is 7 + 8?"}]
        first = client.chat.completions.create(model="flywheel", messages=chat, max_tokens=6)
        old_version = first.model
        auth = {"Authorization": f"Bearer {admin}"}
        r = httpx.post(
            server.url + "/api/admin/tasks",
            headers=auth,
            timeout=120,
            json={
                "kind": "ranking",
                "k": 3,
                "labels_needed": 2,
                "max_tokens": 6,
                "from_conversations": 5,
                "prompts": ["Capital of France?", "Reverse the word cat.", "Count the letters in dog."],
            },
        )
        assert r.status_code == 201 and len(r.json()["created"]) >= 3, r.text
        for name, token in labelers.items():
            h = {"Authorization": f"Bearer {token}"}
            while (task := httpx.get(server.url + "/api/label/next", headers=h).json()["task"]) is not None:
                ids = [c["id"] for c in task["candidates"]]
                r = httpx.post(
                    server.url + "/api/label/rankings",
                    headers=h,
                    json={
                        "task_id": task["id"],
                        "order": [[ids[0]], ids[1:]],
                        "idempotency_key": f"{name}-{task['id']}",
                    },
                )
                assert r.status_code == 200, r.text
            for i, (q, a) in enumerate([("Capital of France?", "Paris."), ("What is 2 + 2?", "It is 4.")]):
                r = httpx.post(
                    server.url + "/api/label/demonstrations",
                    headers=h,
                    json={
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": f"{a} ({name})"},
                        ],
                        "idempotency_key": f"{name}-demo-{i}",
                    },
                )
                assert r.status_code == 200, r.text
        manifest = export(ExportConfig(db=db, out=str(tmp_path / "export"), eval_labelers="ben"))
        assert manifest["files"]["rankings.jsonl"] >= 3 and manifest["files"]["rankings.eval.jsonl"] >= 3
        assert manifest["model_versions"] == [old_version]
        ppo_yaml = tmp_path / "ppo.yaml"
        ppo_yaml.write_text("rollout_batch_size: 4\nbatch_size: 4\nppo_epochs: 1\nmax_new_tokens: 6\n")
        monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", admin)
        monkeypatch.chdir(tmp_path)
        bad_yaml = tmp_path / "bad-ppo.yaml"
        bad_yaml.write_text("kl_coeff: 0.1\n")
        with pytest.raises(UserError, match=f"{bad_yaml}: unknown field"):  # found before SFT and the RM train
            run_round(
                RoundConfig(
                    export=str(tmp_path / "export"), policy=str(model_dir), out="bad", ppo_config=str(bad_yaml)
                )
            )
        assert not (tmp_path / "bad").exists()
        report = run_round(
            RoundConfig(
                export=str(tmp_path / "export"),
                policy=str(model_dir),
                out="round",  # relative: round.json still names every stage's directory by its absolute path
                server=server.url,
                max_steps=2,
                ppo_config=str(ppo_yaml),
            )
        )
        assert set(report["stages"]) == {"sft", "rm", "ppo"}
        assert all(Path(p).is_absolute() and Path(p).is_dir() for p in report["stages"].values())
        new_version = report["deployed"]["version"]
        assert new_version != old_version and report["deployed"]["previous"] == old_version
        assert httpx.get(server.url + "/api/admin/model", headers=auth).json()["version"] == new_version
        second = client.chat.completions.create(model="flywheel", messages=chat, max_tokens=6)
        assert second.model == new_version
        with pytest.raises(openai.NotFoundError):  # a client pinned to the old version is told it is gone
            client.chat.completions.create(model=old_version, messages=chat, max_tokens=6)
    with store.session() as s:
        answers = s.scalars(select(Message).where(Message.role == "assistant").order_by(Message.id)).all()
        assert answers[0].model_version == old_version and answers[-1].model_version == new_version
        assert {v.id for v in s.scalars(select(ModelVersion))} == {old_version, new_version}
    store.close()
    # A bad path is refused with a clear error, and the server keeps serving.
    from flywheel.errors import UserError
    from flywheel.round import deploy

    with LiveServer(create_app(ServeSettings(model=str(model_dir), db=db))) as server:
        with pytest.raises(UserError, match="not a model directory"):
            deploy(server.url, str(tmp_path / "nowhere"), token=admin)
        # the round's reward model sits beside its policy: one slip of the path must not put it behind the chat
        with pytest.raises(UserError, match="is a reward model .*ForSequenceClassification.*not a language model"):
            deploy(server.url, str(tmp_path / "round" / "rm" / "final"), token=admin)
        assert httpx.get(server.url + "/api/admin/model", headers=auth).json()["path"] == str(model_dir.resolve())
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="anon", max_retries=0)
        assert client.chat.completions.create(model="flywheel", messages=chat, max_tokens=4).choices
