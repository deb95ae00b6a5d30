"""`flywheel round --gate-prompts`: people gate the deployment. The served policy's and the new policies' greedy
answers to held-out prompts become blind ranking tasks in the workbench; the policy the labelers prefer with 95%
confidence is deployed, else the served one stays; gate tasks never reach an export."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def test_ranking_outcome_against_brute_force():
    from flywheel.eval.gate import ranking_outcome

    for k in (2, 3, 4):
        for perm in itertools.permutations(range(k)):
            for cut in range(1, k):  # a ranking with one tie group: perm[:cut] best (tied), then the rest in order
                order = [list(perm[:cut])] + [[p] for p in perm[cut:]]
                for a, b in itertools.product(range(k), repeat=2):
                    place = {p: g for g, group in enumerate(order) for p in group}
                    expected = 0.5 if place[a] == place[b] else float(place[a] < place[b])
                    assert ranking_outcome(order, a, b) == expected


def _policy(tokenizer, seed: int, path):
    """A nano Llama with large random weights: its greedy answers differ from prompt to prompt and from policy to
    policy (a freshly initialised one answers every prompt with the same newlines)."""
    import torch

    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained

    model = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_pretrained(model, tokenizer, path, extra={"steps": 4})


@pytest.fixture
def served_dir(tmp_path, tokenizer):
    return _policy(tokenizer, 0, tmp_path / "served")


@pytest.fixture
def candidate_dir(tmp_path, tokenizer):
    """A "PPO run": a saved policy at step 2 and the final one at step 4."""
    _policy(tokenizer, 1, tmp_path / "ppo" / "policies" / "step-2")
    return _policy(tokenizer, 2, tmp_path / "ppo" / "final")


def _labeler(url: str, token: str, admin: str, prefer, stop: threading.Event) -> None:
    """A labeler in the workbench who ranks the answer of the policy `prefer(model_paths)` picks first. (The test
    reads which policy wrote which answer through the admin API; the workbench shows the texts only.)"""
    h = {"Authorization": f"Bearer {token}"}
    while not stop.is_set():
        task = httpx.get(url + "/api/label/next", headers=h).json()["task"]
        if task is None:
            stop.wait(0.02)
            continue
        assert set(task["candidates"][0]) == {"id", "text"}  # blind: no model in what the labeler sees
        gate = httpx.get(url + f"/api/admin/gate?ids={task['id']}", headers={"Authorization": f"Bearer {admin}"})
        version_of = {c["text"]: c["model_version"] for c in gate.json()["tasks"][0]["candidates"]}
        best = prefer(set(version_of.values()))
        ids = sorted(task["candidates"], key=lambda c: version_of[c["text"]] != best)
        order = [[ids[0]["id"]], [c["id"] for c in ids[1:]]]
        r = httpx.post(
            url + "/api/label/rankings",
            headers=h,
            json={"task_id": task["id"], "order": order, "idempotency_key": f"gate-{task['id']}-{token[:6]}"},
        )
        assert r.status_code == 200, r.text


def _gate_config(tmp_path, served_dir, url: str, prompts, **gate):
    from flywheel.round import RoundConfig

    return RoundConfig(
        export=str(tmp_path),
        policy=str(served_dir),
        out=str(tmp_path / "round"),
        server=url,
        gate_prompts=str(prompts),
        gate_poll=0.05,
        gate_max_new_tokens=8,
        **gate,
    )


def test_a_prompt_ranked_by_several_labelers_counts_once():
    """Two labelers who rank alike judge the same pair of answers: 11 of 16 prompts for the candidate is not enough
    for 95% confidence, however many labelers repeat it (counted per ranking, 22 of 32 would be)."""
    from flywheel.eval.gate import choose, judge, prompt_outcome, ranking_outcome
    from flywheel.eval.policy import mean_interval

    better, worse = [[0], [1]], [[1], [0]]  # rankings of (candidate 0, incumbent 1), best first
    prompts = [[better, better]] * 11 + [[worse, worse]] * 5
    outcomes = [prompt_outcome(orders, 0, 1) for orders in prompts]
    assert outcomes == [1.0] * 11 + [0.0] * 5
    candidate = judge("step-4", 4, outcomes)
    assert (candidate.ci95_low, candidate.ci95_high) == pytest.approx(mean_interval(outcomes))
    assert candidate.ci95_low < 0.5 and choose([candidate]) is None
    per_ranking = [ranking_outcome(order, 0, 1) for orders in prompts for order in orders]
    assert choose([judge("step-4", 4, per_ranking)]) is not None  # what counting rankings would have deployed
    # labelers who disagree on a prompt make it half a win; a tie within one ranking is half of that ranking
    assert prompt_outcome([better, worse], 0, 1) == 0.5
    assert prompt_outcome([better, [[0, 1]]], 0, 1) == 0.75
    with pytest.raises(ValueError):
        prompt_outcome([], 0, 1)


@pytest.mark.parametrize("preferred", ["final", "served"])
def test_the_labelers_choice_is_deployed_or_the_served_policy_stays(
    tmp_path, served_dir, candidate_dir, monkeypatch, preferred
):
    from flywheel.feedback.export import ExportConfig, export
    from flywheel.feedback.store import Store
    from flywheel.round import human_gate
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer
    from flywheel.serve.worker import model_version

    prompts = tmp_path / "gate.jsonl"
    questions = [f"Question {i}: what is {i} + {i}?" for i in range(8)]
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    db = str(tmp_path / "fb.db")
    app = create_app(ServeSettings(model=str(served_dir), db=db))
    store = Store(db)
    admin = store.create_user("admin", "admin")
    labelers = [store.create_user(name, "labeler") for name in ("ann", "ben")]
    served, final = model_version(str(served_dir)), model_version(str(candidate_dir))
    target = final if preferred == "final" else served
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", admin)
    with LiveServer(app) as server:
        stop = threading.Event()
        bots = [
            threading.Thread(target=_labeler, args=(server.url, t, admin, lambda v: target, stop)) for t in labelers
        ]
        for bot in bots:
            bot.start()
        try:
            cfg = _gate_config(tmp_path, served_dir, server.url, prompts, gate_labels=2, gate_timeout=120)
            cfg.validate()
            gate = human_gate(cfg, str(served_dir), str(candidate_dir))
        finally:
            stop.set()
            for bot in bots:
                bot.join()
        assert gate["prompts"] == 8 and len(gate["tasks"]) >= 6  # some prompts may get the same answer from all
        assert [c["step"] for c in gate["candidates"]] == [2, 4]
        assert gate["judged_prompts"] == 8  # one outcome per prompt (a prompt without a task: a tie)
        assert gate["rankings"] == 2 * len(gate["tasks"])
        by_step = {c["step"]: c for c in gate["candidates"]}
        if preferred == "final":
            assert gate["deployed"] == str(candidate_dir)
            assert by_step[4]["ci95_low"] > 0.5
        else:
            assert gate["deployed"] == str(served_dir)
            assert all(c["win_rate"] < 0.5 for c in gate["candidates"])
        # the gate's prompts and rankings stay out of the training data
        manifest = export(ExportConfig(db=db, out=str(tmp_path / "export")))
        assert manifest["files"]["rankings.jsonl"] == 0 and manifest["files"]["prompts.jsonl"] == 0
    store.close()


def test_no_rankings_before_the_timeout_keeps_the_served_policy(tmp_path, served_dir, candidate_dir, monkeypatch):
    from flywheel.feedback.store import Store
    from flywheel.round import human_gate
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    prompts = tmp_path / "gate.txt"
    prompts.write_text("Tell me about cats.\nWhat is 3 + 4?\n")
    db = str(tmp_path / "fb.db")
    app = create_app(ServeSettings(model=str(served_dir), db=db))
    store = Store(db)
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", store.create_user("admin", "admin"))
    with LiveServer(app) as server:
        gate = human_gate(
            _gate_config(tmp_path, served_dir, server.url, prompts, gate_timeout=0),
            str(served_dir),
            str(candidate_dir),
        )
    assert gate["deployed"] == str(served_dir) and gate["candidates"] == [] and gate["judged_prompts"] == 0
    store.close()


def test_gate_api_rules(tmp_path, served_dir):
    from flywheel.feedback.store import Store
    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer

    db = str(tmp_path / "fb.db")
    app = create_app(ServeSettings(model=str(served_dir), db=db))
    store = Store(db)
    admin, ann = store.create_user("admin", "admin"), store.create_user("ann", "labeler")
    with LiveServer(app) as server:
        url, auth = server.url + "/api/admin/gate", {"Authorization": f"Bearer {admin}"}
        answer = {"model_version": "v-a", "model_path": "/a"}
        items = [
            {"prompt": "Hi?", "answers": [{"text": "Hello.", **answer}, {"text": "Hey.", "model_version": "v-b"}]},
            {"prompt": "Same?", "answers": [{"text": "Yes.", **answer}, {"text": " Yes. ", "model_version": "v-b"}]},
        ]
        r = httpx.post(url, headers=auth, json={"items": items})
        assert r.status_code == 201, r.text
        first, second = r.json()["tasks"]
        assert isinstance(first, int) and second is None  # the same answer twice: nothing to rank
        got = httpx.get(url, params={"ids": str(first)}, headers=auth).json()["tasks"][0]
        assert [c["model_version"] for c in got["candidates"]] == ["v-a", "v-b"] and got["rankings"] == []
        labeler = {"Authorization": f"Bearer {ann}"}
        assert httpx.post(url, headers=labeler, json={"items": items}).status_code == 403
        assert httpx.get(url, params={"ids": str(first)}, headers=labeler).status_code == 403
        bad = {"items": [{"prompt": [{"role": "assistant", "content": "x"}], "answers": items[0]["answers"]}]}
        r = httpx.post(url, headers=auth, json=bad)
        assert r.status_code == 400 and "user" in r.json()["error"]["message"]
        assert httpx.post(url, headers=auth, json={"items": [{"prompt": "x", "answers": []}]}).status_code == 400
        assert httpx.get(url, params={"ids": "1,x"}, headers=auth).status_code == 400
        assert httpx.get(url, params={"ids": "999"}, headers=auth).status_code == 404
        assert httpx.get(url, params={"ids": str(2**70)}, headers=auth).status_code == 404
    store.close()


@pytest.mark.parametrize("choice", ["served", "final"])
def test_round_deploys_only_what_the_gate_chose(tmp_path, served_dir, candidate_dir, monkeypatch, choice):
    import flywheel.round as round_module
    from flywheel.round import RoundConfig, run_round
    from flywheel.train import reward
    from flywheel.train.ppo import trainer

    export = tmp_path / "export"
    export.mkdir()
    (export / "rankings.jsonl").write_text("{}\n")
    (export / "prompts.jsonl").write_text("{}\n")
    (tmp_path / "gate.txt").write_text("Hi?\n")
    monkeypatch.setattr(reward, "train_reward", lambda cfg: tmp_path / "rm")
    monkeypatch.setattr(trainer, "train_ppo", lambda cfg: candidate_dir.parent)
    chosen = str(served_dir) if choice == "served" else str(candidate_dir.resolve())
    monkeypatch.setattr(round_module, "human_gate", lambda cfg, incumbent, final: {"deployed": chosen})
    deployed = []
    monkeypatch.setattr(round_module, "deploy", lambda server, path: deployed.append(path) or {"version": "v"})
    cfg = RoundConfig(
        export=str(export),
        policy=str(served_dir),
        out=str(tmp_path / "round"),
        server="http://127.0.0.1:9",
        gate_prompts=str(tmp_path / "gate.txt"),
    )
    report = run_round(cfg)
    assert report["gate"] == {"deployed": chosen}
    assert deployed == ([] if choice == "served" else [chosen])
    assert report["deployed"] == (None if choice == "served" else {"version": "v"})
    assert json.loads((tmp_path / "round" / "round.json").read_text())["gate"] == {"deployed": chosen}


def test_gate_settings_are_checked(tmp_path):
    from flywheel.errors import UserError
    from flywheel.round import RoundConfig

    (tmp_path / "gate.txt").write_text("Hi?\n")
    base = dict(export=str(tmp_path), policy="p", out=str(tmp_path / "out"), gate_prompts=str(tmp_path / "gate.txt"))
    with pytest.raises(UserError, match="needs --server"):
        RoundConfig(**base).validate()
    with pytest.raises(UserError, match="no such file"):
        RoundConfig(**{**base, "gate_prompts": str(tmp_path / "none.txt")}, server="http://x").validate()
    with pytest.raises(UserError, match="--gate-labels"):
        RoundConfig(**base, server="http://x", gate_labels=0).validate()
