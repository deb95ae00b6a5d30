"""The feedback database: migrations, users and tokens, chat trees, idempotent submissions, the task queue,
agreement, and the export the trainers read. Every test runs on SQLite and, when `FLYWHEEL_TEST_POSTGRES_URL` is
set (CI starts a server), on PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import json
import os

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

POSTGRES = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL")


def _reset_postgres(url: str) -> None:
    from sqlalchemy import text

    from flywheel.feedback.db import connect

    engine = connect(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fb.db'}"
    if not POSTGRES:
        pytest.skip("FLYWHEEL_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    pytest.importorskip("psycopg")
    _reset_postgres(POSTGRES)
    return POSTGRES


@pytest.fixture
def store(db_url):
    from flywheel.feedback.db import upgrade
    from flywheel.feedback.store import Store

    upgrade(db_url)
    s = Store(db_url)
    s.register_model_version("v1", "/models/v1")
    yield s
    s.close()


PROMPT = [{"role": "user", "content": "2+2?"}]


def ranking_task(store, labels_needed=2, texts=("4", "5", "four")):
    return store.create_ranking_task(PROMPT, [(t, "v1", "stop") for t in texts], labels_needed=labels_needed)


def test_migrations_create_the_schema_and_rerun_cleanly(db_url):
    from sqlalchemy import inspect, text

    from flywheel.feedback.db import connect, head_revision, upgrade

    upgrade(db_url)
    upgrade(db_url)  # already at head: nothing to do
    engine = connect(db_url)
    tables = set(inspect(engine).get_table_names())
    assert {
        "users",
        "model_versions",
        "conversations",
        "messages",
        "votes",
        "tasks",
        "candidates",
        "rankings",
        "demonstrations",
        "task_skips",
        "alembic_version",
    } <= tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision() != "0001"
        if db_url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_the_migrations_build_what_the_models_declare(db_url):
    """`alembic upgrade head` and the SQLAlchemy models agree (an autogenerate diff would be empty)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from flywheel.feedback.db import connect, upgrade
    from flywheel.feedback.models import Base

    upgrade(db_url)
    engine = connect(db_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_upgrade_from_0001_rekeys_conversation_owners(db_url):
    """A database made by revision 0001 (browsers stored as `anon:<id>`, API calls as `anonymous`) upgrades in place:
    each client's conversations stay together under a hash of its id; the shared `anonymous` bucket and ids too short
    to be unguessable go to the admins-only owner."""
    from sqlalchemy import text

    from flywheel.feedback.db import connect, upgrade
    from flywheel.feedback.store import UNIDENTIFIED, Store, client_owner

    upgrade(db_url, "0001")
    long_id = "A" * 10 + "b-_" * 5  # 25 characters
    engine = connect(db_url)
    with engine.begin() as conn:
        for owner in (f"anon:{long_id}", f"anon:{long_id}", "anon:short123", "anonymous", "alice"):
            conn.execute(
                text(
                    "INSERT INTO conversations (source, owner, title, created_at, updated_at) "
                    "VALUES ('web', :owner, 't', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"owner": owner},
            )
    engine.dispose()
    upgrade(db_url)
    store = Store(db_url)
    try:
        owners = [c["owner"] for c in sorted(store.all_conversations(), key=lambda c: c["id"])]
        assert owners == [client_owner(long_id)] * 2 + [UNIDENTIFIED, UNIDENTIFIED, "alice"]
        assert len(store.list_conversations(client_owner(long_id))) == 2
        assert store.list_conversations(UNIDENTIFIED) == []  # nobody chats as the unidentified owner
    finally:
        store.close()


def test_tokens_are_stored_hashed(store):
    from sqlalchemy import select

    from flywheel.errors import UserError
    from flywheel.feedback.models import User
    from flywheel.feedback.store import Conflict, hash_token

    token = store.create_user("alice", "labeler")
    assert store.authenticate(token).name == "alice" and store.authenticate(token + "x") is None
    with store.session() as s:
        row = s.scalars(select(User)).one()
        assert row.token_hash == hash_token(token) and token not in row.token_hash
    with pytest.raises(Conflict):
        store.create_user("alice", "admin")
    assert store.create_user("uma", "user") and store.users()[-1].role == "user"
    store.revoke_token("alice")
    assert store.authenticate(token) is None and [u.active for u in store.users()] == [False, True]
    new = store.rotate_token("alice")
    assert store.authenticate(new).name == "alice" and store.authenticate(token) is None
    assert store.rotate_token("alice") != new and store.authenticate(new) is None
    with pytest.raises(UserError, match="no user"):
        store.revoke_token("nobody")
    with pytest.raises(UserError, match="role must be"):
        store.create_user("x", "root")
    for bad in ("client:x", "api:unidentified", " alice", ""):  # could collide with the owners of anonymous chats
        with pytest.raises(UserError, match="user name"):
            store.create_user(bad, "labeler")


def test_conversation_tree_keeps_every_answer_with_its_version(store):
    from flywheel.errors import UserError

    conv = store.create_conversation("anon:abc12345")
    user = store.add_message(conv, "anon:abc12345", None, "user", "hello")
    a1 = store.add_message(conv, "anon:abc12345", user["id"], "assistant", "hi", "v1", "stop")
    a2 = store.add_message(conv, "anon:abc12345", user["id"], "assistant", "hey", "v1", "stop")  # regenerated
    tree = store.conversation(conv, "anon:abc12345")
    assert [(m["id"], m["parent_id"]) for m in tree["messages"]] == [
        (user["id"], None),
        (a1["id"], user["id"]),
        (a2["id"], user["id"]),
    ]
    assert tree["title"] == "hello" and all(m["model_version"] == "v1" for m in tree["messages"][1:])
    assert [m["content"] for m in store.branch(a2["id"])] == ["hello", "hey"]
    with pytest.raises(UserError, match="role 'assistant' where 'user'"):  # turns alternate along a branch
        store.add_message(conv, "anon:abc12345", a1["id"], "assistant", "again")
    with pytest.raises(UserError, match="no conversation"):  # other people's conversations do not exist for you
        store.add_message(conv, "anon:other000", user["id"], "assistant", "x")
    vote, created = store.vote(a1["id"], "anon:abc12345", 1, "nice", "key-1")
    again, created_again = store.vote(a1["id"], "anon:abc12345", 1, "nice", "key-1")
    assert created and not created_again and vote == again


def test_a_system_prompt_turn_is_stored_whole_or_not_at_all(store):
    from flywheel.errors import UserError

    owner = "client:abc"
    conv = store.create_conversation(owner)
    system, user = store.add_user_turn(conv, owner, None, "hello", system="Be brief.")
    assert (system["role"], system["parent_id"], user["parent_id"]) == ("system", None, system["id"])
    answer = store.add_message(conv, owner, user["id"], "assistant", "hi", "v1", "stop")
    with pytest.raises(UserError, match="parent_id null"):  # a system prompt only starts a branch
        store.add_user_turn(conv, owner, answer["id"], "more", system="Be long.")
    with pytest.raises(UserError, match="content"):  # a blank system prompt: nothing is stored
        store.add_user_turn(conv, owner, None, "hello", system=" ")
    assert len(store.conversation(conv, owner)["messages"]) == 3


def test_rename_and_delete_a_conversation(store):
    from sqlalchemy import select

    from flywheel.errors import UserError
    from flywheel.feedback.models import Message, Task, Vote
    from flywheel.feedback.store import NotFound

    owner = "client:abc"
    conv = store.create_conversation(owner)
    kept = store.create_conversation(owner)
    store.add_message(kept, owner, None, "user", "stays")
    _, user = store.add_user_turn(conv, owner, None, "hello", system="Be brief.")
    answers = [store.add_message(conv, owner, user["id"], "assistant", t, "v1", "stop") for t in ("hi", "hey")]
    store.add_message(conv, owner, answers[0]["id"], "user", "and then?")
    store.vote(answers[1]["id"], owner, 1, "", "k-1")
    task = store.create_ranking_task(
        [{"role": "user", "content": "hello"}],
        [("a", "v1", "stop"), ("b", "v1", "stop")],
        source_message_id=user["id"],
    )
    for other in ("client:xyz", "api:unidentified"):
        with pytest.raises(NotFound):
            store.rename_conversation(conv, other, "mine")
        with pytest.raises(NotFound):
            store.delete_conversation(conv, other)
    with pytest.raises(UserError, match="blank"):
        store.rename_conversation(conv, owner, "  ")
    assert store.rename_conversation(conv, owner, " Greeting ") == {"id": conv, "title": "Greeting"}
    store.delete_conversation(conv, owner)
    with pytest.raises(NotFound):
        store.conversation(conv, owner)
    with store.session() as s:
        assert s.scalars(select(Message.content).where(Message.conversation_id == conv)).all() == []
        assert s.scalars(select(Vote)).all() == []
        assert s.get(Task, task).source_message_id is None
    assert [m["content"] for m in store.conversation(kept, owner)["messages"]] == ["stays"]


def test_ranking_submissions_are_idempotent_and_validated(store):
    from flywheel.errors import UserError
    from flywheel.feedback.store import Conflict

    store.create_user("bob", "labeler")
    uid = store.users()[0].id
    task_id = ranking_task(store)
    task = store.next_task(uid, "ranking")
    assert task["id"] == task_id and sorted(c["text"] for c in task["candidates"]) == ["4", "5", "four"]
    by_text = {c["text"]: c["id"] for c in task["candidates"]}
    order = [[by_text["4"], by_text["four"]], [by_text["5"]]]
    with pytest.raises(UserError, match="every candidate"):
        store.submit_ranking(uid, task_id, [[by_text["4"]], [by_text["5"]]], key="k0")
    with pytest.raises(UserError, match="tied"):
        store.submit_ranking(uid, task_id, [list(by_text.values())], key="k0")
    row, created = store.submit_ranking(uid, task_id, order, unsafe=[by_text["5"]], key="k1")
    assert created and row["order"] == [[0, 2], [1]] and row["unsafe"] == [1]
    same, created = store.submit_ranking(uid, task_id, order, key="k1")  # a retry
    assert not created and same == row
    with pytest.raises(Conflict):  # a second ranking of the same task by the same labeler, under a new key
        store.submit_ranking(uid, task_id, order, key="k2")
    assert store.next_task(uid, "ranking") is None


def test_a_skipped_task_is_not_offered_again_and_counts_as_no_label(store):
    from flywheel.feedback.store import Conflict, NotFound

    for name in ("dee", "eve"):
        store.create_user(name, "labeler")
    users = {u.name: u.id for u in store.users()}
    first, second = ranking_task(store), ranking_task(store)
    play = store.create_roleplay_task("Ask about rivers.", labels_needed=1)
    dee = users["dee"]
    assert store.next_task_and_waiting(dee, "ranking") == (store.task(first, dee), 2)
    skip, created = store.skip_task(dee, first, "I cannot judge sums")
    assert created and skip["task_id"] == first and skip["reason"] == "I cannot judge sums"
    again, created = store.skip_task(dee, first, "another reason")  # a second skip keeps the first
    assert not created and again == skip
    assert store.next_task(dee, "ranking")["id"] == second  # the next one, not the skipped one
    assert store.next_task(users["eve"], "ranking")["id"] == first  # a skip is one labeler's: others still get it
    assert store.next_task_and_waiting(dee, "ranking")[1] == 1
    store.skip_task(dee, second)
    assert store.next_task_and_waiting(dee, "ranking") == (None, 0)
    store.skip_task(dee, play)
    assert store.next_task(dee, "roleplay") is None
    # A skipped task can still be labeled by id (the labeler changed their mind); a labeled one cannot be skipped.
    ids = {c["text"]: c["id"] for c in store.task(first, dee)["candidates"]}
    store.submit_ranking(dee, first, [[ids["4"]], [ids["5"], ids["four"]]], key="dee-1")
    eve_ids = {c["text"]: c["id"] for c in store.task(second, users["eve"])["candidates"]}
    store.submit_ranking(users["eve"], second, [[eve_ids["4"]], [eve_ids["5"], eve_ids["four"]]], key="eve-1")
    with pytest.raises(Conflict, match="already ranked"):
        store.skip_task(users["eve"], second)
    with pytest.raises(NotFound):
        store.skip_task(dee, 10_000)
    o = store.overview()
    assert o["queue"]["ranking"]["skips"] == 2 and o["queue"]["roleplay"]["skips"] == 1
    assert o["queue"]["ranking"]["labels"] == 2  # the skips are not labels
    assert o["labelers"]["dee"]["skipped"] == 3 and o["labelers"]["eve"]["skipped"] == 0
    latest = [(k["task_id"], k["kind"], k["labeler"], k["reason"]) for k in o["skips"]]  # newest first
    assert latest == [
        (play, "roleplay", "dee", ""),
        (second, "ranking", "dee", ""),
        (first, "ranking", "dee", "I cannot judge sums"),
    ]


def test_concurrent_skips_store_one_row(store):
    from sqlalchemy import func, select

    from flywheel.feedback.models import TaskSkip

    store.create_user("fay", "labeler")
    uid = store.users()[0].id
    task_id = ranking_task(store)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.skip_task(uid, task_id), range(16)))
    assert sum(created for _, created in results) == 1 and len({row["id"] for row, _ in results}) == 1
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(TaskSkip)) == 1


def test_concurrent_retries_store_one_row(store):
    from sqlalchemy import func, select

    from flywheel.feedback.models import RankingLabel

    store.create_user("carl", "labeler")
    uid = store.users()[0].id
    task_id = ranking_task(store)
    ids = [c["id"] for c in store.next_task(uid, "ranking")["candidates"]]

    def submit(_):
        return store.submit_ranking(uid, task_id, [[ids[0]], ids[1:]], key="same-key")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(16)))
    assert sum(created for _, created in results) == 1
    assert len({row["id"] for row, _ in results}) == 1
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(RankingLabel)) == 1


def test_queue_progress_and_agreement(store):
    from flywheel.feedback.store import pairwise_agreement

    for name in ("ann", "ben", "cat"):
        store.create_user(name, "labeler")
    users = {u.name: u.id for u in store.users()}
    t1 = ranking_task(store, labels_needed=2)
    t2 = store.create_roleplay_task("Ask about capitals.", labels_needed=1)

    def rank(name, positions):
        cands = {c["text"]: c["id"] for c in store.task(t1, users[name])["candidates"]}
        texts = ["4", "5", "four"]
        store.submit_ranking(users[name], t1, [[cands[texts[p]] for p in g] for g in positions], key=f"{name}-1")

    rank("ann", [[0], [2], [1]])
    rank("ben", [[0], [1], [2]])  # agrees with ann on 2 of 3 pairs
    assert store.next_task(users["cat"], "ranking") is None  # the task has its 2 labels
    demo = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    store.submit_demonstration(users["cat"], t2, demo, key="cat-1")
    o = store.overview()
    assert o["queue"]["ranking"] == {"tasks": 1, "done": 1, "labels": 2, "labels_needed": 2, "skips": 0}
    assert o["queue"]["roleplay"]["done"] == 1
    assert o["labelers"]["ann"]["rankings"] == 1 and o["labelers"]["cat"]["demonstrations"] == 1
    assert o["agreement"]["pairs"] == 3 and o["agreement"]["rate"] == pytest.approx(2 / 3)
    assert o["agreement"]["per_labeler"]["ann"]["rate"] == pytest.approx(2 / 3)
    # Ties are not compared; pairs only count when both labelers ordered them.
    tied = pairwise_agreement([(1, "a", [[0, 1], [2]]), (1, "b", [[1], [0], [2]])])
    assert tied["pairs"] == 2 and tied["rate"] == 1.0


def _rank_all(store, uid, task_id, key):
    ids = [c["id"] for c in store.task(task_id, uid)["candidates"]]
    return store.submit_ranking(uid, task_id, [[ids[0]], ids[1:]], key=key)


DEMO = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]


def test_labels_needed_one_label_per_labeler_and_one_vote_per_message(store):
    from flywheel.feedback.store import Conflict

    for name in ("ann", "ben", "cat"):
        store.create_user(name, "labeler")
    uid = {u.name: u.id for u in store.users()}
    task = ranking_task(store, labels_needed=2)
    assert _rank_all(store, uid["ann"], task, "a")[1] and _rank_all(store, uid["ben"], task, "b")[1]
    with pytest.raises(Conflict, match="already has the 2 label"):  # by id, past the queue
        _rank_all(store, uid["cat"], task, "c")
    assert _rank_all(store, uid["ann"], task, "a")[1] is False  # a retry is still a replay, not a conflict
    with pytest.raises(Conflict, match="already ranked by this labeler"):
        _rank_all(store, uid["ann"], task, "a-again")
    play = store.create_roleplay_task("Ask about capitals.", labels_needed=2)
    assert store.submit_demonstration(uid["ann"], play, DEMO, key="d-a")[1]
    with pytest.raises(Conflict, match="already written a demonstration for by this labeler"):
        store.submit_demonstration(uid["ann"], play, DEMO, key="d-a2")
    assert store.submit_demonstration(uid["ben"], play, DEMO, key="d-b")[1]
    with pytest.raises(Conflict, match="already has the 2 label"):
        store.submit_demonstration(uid["cat"], play, DEMO, key="d-c")
    assert store.submit_demonstration(uid["ann"], None, DEMO, key="free-1")[1]  # free-form ones: no task, no cap
    assert store.submit_demonstration(uid["ann"], None, DEMO, key="free-2")[1]
    # votes: a second vote of the same voter replaces the first; the same key again is a replay
    conv = store.create_conversation("client:x")
    q = store.add_message(conv, "client:x", None, "user", "hi")
    a = store.add_message(conv, "client:x", q["id"], "assistant", "hello", "v1", "stop")
    up, created = store.vote(a["id"], "client:x", 1, "", "k1")
    down, replaced = store.vote(a["id"], "client:x", -1, "wrong", "k2")
    assert created and replaced and down["id"] == up["id"] and down["value"] == -1 and down["comment"] == "wrong"
    assert store.vote(a["id"], "client:x", -1, "wrong", "k2") == (down, False)
    assert store.vote(a["id"], "client:y", 1, "", "k1")[0]["id"] != up["id"]  # another voter: their own vote
    assert store.overview()["votes"] == {"up": 1, "down": 1}


def test_concurrent_labels_never_exceed_labels_needed(store):
    """16 labelers rank one task that needs 3 labels, at once: 3 stored, 13 told it is complete."""
    from sqlalchemy import func, select

    from flywheel.feedback.models import RankingLabel
    from flywheel.feedback.store import Conflict

    for i in range(16):
        store.create_user(f"l{i}", "labeler")
    uids = [u.id for u in store.users()]
    task = ranking_task(store, labels_needed=3)

    def submit(uid):
        try:
            return _rank_all(store, uid, task, f"k{uid}")[1]
        except Conflict:
            return "full"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, uids))
    assert results.count(True) == 3 and results.count("full") == 13
    with store.session() as s:
        slots = s.scalars(select(RankingLabel.slot).where(RankingLabel.task_id == task)).all()
        assert sorted(slots) == [0, 1, 2]
        assert s.scalar(select(func.count()).select_from(RankingLabel)) == 3


def test_concurrent_votes_of_one_voter_leave_one_vote(store):
    """16 different votes of one voter on one message at once: one row, holding one of them; each was answered."""
    from sqlalchemy import select

    from flywheel.feedback.models import Vote

    conv = store.create_conversation("client:x")
    q = store.add_message(conv, "client:x", None, "user", "hi")
    a = store.add_message(conv, "client:x", q["id"], "assistant", "hello", "v1", "stop")

    def vote(i):
        return store.vote(a["id"], "client:x", 1 if i % 2 else -1, f"c{i}", f"k{i}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(vote, range(16)))
    assert all(created for _, created in results) and len({row["id"] for row, _ in results}) == 1
    with store.session() as s:
        rows = s.scalars(select(Vote)).all()
        assert len(rows) == 1 and rows[0].comment in {f"c{i}" for i in range(16)}


def test_the_schema_holds_the_rules_without_the_store(store):
    """Rows written around the Store's checks are refused by the database itself."""
    from sqlalchemy.exc import IntegrityError

    from flywheel.feedback.models import Demonstration, RankingLabel, Vote

    store.create_user("ann", "labeler")
    store.create_user("ben", "labeler")
    ann, ben = (u.id for u in store.users())
    task = ranking_task(store, labels_needed=1)
    play = store.create_roleplay_task("Ask.", labels_needed=3)
    _rank_all(store, ann, task, "a")
    store.submit_demonstration(ann, play, DEMO, key="d")
    conv = store.create_conversation("client:x")
    q = store.add_message(conv, "client:x", None, "user", "hi")
    a = store.add_message(conv, "client:x", q["id"], "assistant", "hello", "v1", "stop")
    store.vote(a["id"], "client:x", 1, "", "k1")
    ranking = dict(order=[[0], [1, 2]], unsafe=[], comment="", idempotency_key="x")
    bad_rows = {
        "a second label in a taken slot": RankingLabel(task_id=task, labeler_id=ben, slot=0, **ranking),
        "a negative slot": RankingLabel(task_id=task, labeler_id=ben, slot=-1, **ranking),
        "a second demonstration of one task by one labeler": Demonstration(
            task_id=play, labeler_id=ann, slot=1, messages=DEMO, suggestions=[], edited=True, idempotency_key="y"
        ),
        "a task's demonstration without a slot": Demonstration(
            task_id=play, labeler_id=ben, slot=None, messages=DEMO, suggestions=[], edited=True, idempotency_key="z"
        ),
        "a second vote of one voter on one message": Vote(
            message_id=a["id"], voter="client:x", value=-1, comment="", idempotency_key="k2"
        ),
    }
    for what, row in bad_rows.items():
        with store.session() as s:
            s.add(row)
            with pytest.raises(IntegrityError):
                s.commit()
                pytest.fail(f"the database accepted {what}")


def test_upgrade_from_0003_keeps_the_data_and_adds_the_rules(db_url):
    """A database with data the new rules forbid (two demonstrations of one task by one labeler, two votes of one
    voter on one message) upgrades: labels are numbered into slots, the extra demonstration becomes free-form, the
    latest vote stays; then the rules hold."""
    from sqlalchemy import text

    from flywheel.feedback.db import connect, upgrade
    from flywheel.feedback.store import Conflict, Store

    upgrade(db_url, "0003")
    engine = connect(db_url)
    now = "CURRENT_TIMESTAMP"
    with engine.begin() as conn:
        run = lambda sql, **kw: conn.execute(text(sql), kw)  # noqa: E731
        run(f"INSERT INTO users (name, role, token_hash, created_at) VALUES ('ann', 'labeler', 'h1', {now})")
        run(f"INSERT INTO users (name, role, token_hash, created_at) VALUES ('ben', 'labeler', 'h2', {now})")
        run(f"INSERT INTO users (name, role, token_hash, created_at) VALUES ('cat', 'labeler', 'h3', {now})")
        run(f"INSERT INTO model_versions (id, path, created_at) VALUES ('v1', '/m', {now})")
        for kind in ("ranking", "roleplay"):
            run(
                "INSERT INTO tasks (kind, prompt, instruction, source, labels_needed, created_at) "
                f"VALUES (:kind, NULL, 'x', 'admin', 2, {now})",
                kind=kind,
            )
        for labeler in (1, 2):
            run(
                'INSERT INTO rankings (task_id, labeler_id, "order", unsafe, comment, idempotency_key, created_at) '
                f"VALUES (1, :l, '[[0], [1]]', '[]', '', :k, {now})",
                l=labeler,
                k=f"r{labeler}",
            )
        for key in ("d1", "d2"):  # ann wrote task 2 twice
            run(
                "INSERT INTO demonstrations (task_id, labeler_id, messages, suggestions, edited, idempotency_key, "
                f"created_at) VALUES (2, 1, :m, '[]', TRUE, :k, {now})",
                m=json.dumps(DEMO),
                k=key,
            )
        for pos in (0, 1):
            run(
                "INSERT INTO candidates (task_id, position, text, model_version, created_at) "
                f"VALUES (1, :p, :t, 'v1', {now})",
                p=pos,
                t=f"answer {pos}",
            )
        run(
            "INSERT INTO conversations (source, owner, title, created_at, updated_at) "
            f"VALUES ('web', 'o', '', {now}, {now})"
        )
        run(f"INSERT INTO messages (conversation_id, role, content, created_at) VALUES (1, 'user', 'hi', {now})")
        run(
            "INSERT INTO messages (conversation_id, parent_id, role, content, model_version, created_at) "
            f"VALUES (1, 1, 'assistant', 'yo', 'v1', {now})"
        )
        for value, key in ((1, "v1"), (-1, "v2")):
            run(
                "INSERT INTO votes (message_id, voter, value, comment, idempotency_key, created_at) "
                f"VALUES (2, 'o', :v, '', :k, {now})",
                v=value,
                k=key,
            )
    upgrade(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT slot FROM rankings ORDER BY id")).scalars().all() == [0, 1]
        demos = conn.execute(text("SELECT task_id, slot FROM demonstrations ORDER BY id")).all()
        assert [tuple(d) for d in demos] == [(2, 0), (None, None)]
        assert [tuple(v) for v in conn.execute(text("SELECT value, idempotency_key FROM votes")).all()] == [(-1, "v2")]
    engine.dispose()
    store = Store(db_url)
    try:
        with pytest.raises(Conflict, match="already has the 2 label"):
            store.submit_ranking(3, 1, [[1], [2]], key="late")
        with pytest.raises(Conflict, match="already written"):
            store.submit_demonstration(1, 2, DEMO, key="d3")
        assert store.submit_demonstration(2, 2, DEMO, key="d-ben")[0]["id"] == 3
        with pytest.raises(Conflict, match="already has the 2 label"):
            store.submit_demonstration(3, 2, DEMO, key="d-cat")
        assert store.vote(2, "o", 1, "", "v3")[0]["value"] == 1
    finally:
        store.close()


def test_export_writes_what_the_trainers_read(store, tmp_path, db_url):
    from flywheel.data.io import read_conversations, read_preferences, read_prompts
    from flywheel.feedback.export import ExportConfig, export

    for name in ("ann", "ben", "eve"):
        store.create_user(name, "labeler")
    users = {u.name: u.id for u in store.users()}
    store.create_user("cy", "user")  # chats, labels nothing: in neither list of labelers
    t1 = ranking_task(store, labels_needed=3)
    t2 = store.create_ranking_task(
        [{"role": "user", "content": "Capital of France?"}],
        [("Paris", "v1", "stop"), ("Rome", "v1", "stop")],
        labels_needed=3,
    )
    for name in users:
        for tid in (t1, t2):
            ids = [c["id"] for c in sorted(store.task(tid, users[name])["candidates"], key=lambda c: c["text"])]
            store.submit_ranking(users[name], tid, [[ids[0]], ids[1:]], key=f"{name}-{tid}")
    demo = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    store.submit_demonstration(users["ann"], None, demo, key="a1")
    store.submit_demonstration(users["ben"], None, demo, key="b1")  # the same text twice: exported once
    store.submit_demonstration(users["eve"], None, demo, key="e1")  # ...and eve is held out: only in eval
    store.submit_demonstration(
        users["ann"], None, demo[:1] + [{"role": "assistant", "content": "It is Lima."}], key="a2"
    )
    conv = store.create_conversation("anon:abcdefgh")
    store.add_message(conv, "anon:abcdefgh", None, "user", "Reverse 'abc'.")
    manifest = export(ExportConfig(db=db_url, out=str(tmp_path / "out"), eval_labelers="eve"))
    out = tmp_path / "out"
    assert manifest["eval_labelers"] == ["eve"] and manifest["train_labelers"] == ["ann", "ben"]
    demos, demos_eval = read_conversations(out / "demos.jsonl"), read_conversations(out / "demos.eval.jsonl")
    assert [c.messages[-1].content for c in demos] == ["It is Lima."] and len(demos_eval) == 1
    ranks, ranks_eval = read_preferences(out / "rankings.jsonl"), read_preferences(out / "rankings.eval.jsonl")
    assert len(ranks) == 4 and {r.labeler for r in ranks} == {"ann", "ben"}
    assert len(ranks_eval) == 2 and {r.labeler for r in ranks_eval} == {"eve"}
    first = json.loads((out / "rankings.jsonl").read_text().splitlines()[0])
    assert first["model_versions"] == ["v1"] * len(first["completions"])
    prompts = read_prompts(out / "prompts.jsonl")
    assert [p[-1].content for p in prompts] == ["2+2?", "Capital of France?", "Reverse 'abc'."]
    assert json.loads((out / "manifest.json").read_text())["files"]["rankings.jsonl"] == 4
    # Held-out by hash: the choice depends on the name alone, so it is stable across exports.
    from flywheel.feedback.export import is_held_out

    cfg = ExportConfig(out="x", eval_fraction=0.5)
    picks = [is_held_out(f"labeler-{i}", cfg) for i in range(200)]
    assert picks == [is_held_out(f"labeler-{i}", cfg) for i in range(200)] and 60 < sum(picks) < 140


def test_an_empty_answer_is_stored_as_given_but_is_no_training_data(store, tmp_path, db_url):
    """A model may end its answer at once: the chat keeps that answer (it can be voted on, regenerated and talked
    past), but neither the upvoted demonstrations nor the prompts that export writes take a branch holding it."""
    from flywheel.data.io import read_conversations, read_prompts
    from flywheel.errors import UserError
    from flywheel.feedback.export import ExportConfig, export

    owner = "client:abc"
    conv = store.create_conversation(owner)
    _, user = store.add_user_turn(conv, owner, None, "hello", system="Be brief.")
    empty = store.add_message(conv, owner, user["id"], "assistant", "", "v1", "stop")
    stopped = store.add_message(conv, owner, user["id"], "assistant", "", "v1", "cancelled")
    good = store.add_message(conv, owner, user["id"], "assistant", "Hi!", "v1", "stop")
    assert [m["content"] for m in store.branch(empty["id"])] == ["Be brief.", "hello", ""]
    later = store.add_message(conv, owner, empty["id"], "user", "Say something.")  # the chat goes on past it
    store.add_message(conv, owner, later["id"], "assistant", "Something.", "v1", "stop")
    for bad in ("", " \n"):  # a person's turn still needs text
        with pytest.raises(UserError, match=r"messages\[3\] \(user\) has empty content"):
            store.add_message(conv, owner, good["id"], "user", bad)
    for answer in (empty, stopped, good):
        store.vote(answer["id"], owner, 1, "", f"k-{answer['id']}")
    unrelated = store.create_conversation(owner)
    store.add_message(unrelated, owner, None, "user", "Count to 3.")
    assert [m[-1]["content"] for m, _, _ in store.unused_chat_prompts(10)] == ["Count to 3.", "hello"]
    export(ExportConfig(db=db_url, out=str(tmp_path / "out"), include_upvoted=True, eval_fraction=0))
    demos = read_conversations(tmp_path / "out" / "demos.jsonl")
    assert [[m.content for m in c.messages] for c in demos] == [["Be brief.", "hello", "Hi!"]]
    prompts = read_prompts(tmp_path / "out" / "prompts.jsonl")
    assert [[m.content for m in p] for p in prompts] == [["Be brief.", "hello"], ["Count to 3."]]


def test_db_cli_creates_users(tmp_path, capsys):
    from flywheel.cli import main
    from flywheel.feedback.store import Store

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "upgrade", "--db", url]) == 0
    assert main(["db", "create-user", "zoe", "--role", "admin", "--db", url]) == 0
    token = capsys.readouterr().out.strip()
    store = Store(url)
    assert store.authenticate(token).role == "admin"
    store.close()
    assert main(["db", "create-user", "zoe", "--db", url]) == 2  # a user error: exit code 2, one line


def test_export_and_db_refuse_a_database_that_is_not_there(tmp_path, capsys):
    """A mistyped --db is a one-line error that names it, and leaves no empty database behind; so is a held-out
    labeler that the database does not know (nothing would be held out)."""
    from flywheel.cli import main

    missing = tmp_path / "typo.db"
    for argv in (
        ["export", "--db", str(missing), "--out", str(tmp_path / "out")],
        ["db", "users", "--db", str(missing)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"no feedback database at {missing}" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not missing.exists() and not (tmp_path / "out").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    assert main(["export", "--db", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "has no feedback tables: run `flywheel db upgrade" in capsys.readouterr().err
    db = tmp_path / "fb.db"
    assert main(["db", "create-user", "ann", "--db", str(db)]) == 0  # create-user makes the database
    capsys.readouterr()
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "out"), "--eval-labelers", "ann,bob"]) == 2
    assert "--eval-labelers: no user named 'bob'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["db", "users", "--db", str(db)]) == 0
    assert capsys.readouterr().out.split() == ["ann", "labeler", "active"]


def test_a_deleted_message_is_not_answered_or_tasked_under_a_row_that_took_its_id(store, db_url):
    """SQLite hands the highest deleted ids to the next rows. An answer generated for a deleted message, or a task
    made from it, must not land on the new message that took its id: both ask for the message as it was read."""
    from flywheel.feedback.store import NotFound

    owner = "anon:abcdefgh"
    conv = store.create_conversation(owner)
    asked = store.add_user_turn(conv, owner, None, "first secret prompt")[-1]
    stamp = store.message_created(asked["id"])
    prompts = store.unused_chat_prompts(10)
    store.delete_conversation(conv, owner)
    again = store.create_conversation(owner)
    new = store.add_user_turn(again, owner, None, "brand new prompt")[-1]
    assert new["id"] == asked["id"] or not db_url.startswith("sqlite")  # the premise: SQLite reuses the id
    with pytest.raises(NotFound):
        store.add_message(again, owner, asked["id"], "assistant", "old answer", "v1", "stop", parent_created=stamp)
    messages, msg_id, stored = prompts[0]
    cands = [("a", "v1", "stop"), ("b", "v1", "stop")]
    assert store.create_ranking_task(messages, cands, source_message_id=msg_id, source_created=stored) is None
    assert [m["content"] for m in store.conversation(again, owner)["messages"]] == ["brand new prompt"]
    # the message as read is still there: both go through
    answer = store.add_message(
        again, owner, new["id"], "assistant", "yes", "v1", "stop", parent_created=store.message_created(new["id"])
    )
    assert answer["parent_id"] == new["id"]
    (messages, msg_id, stored), *_ = store.unused_chat_prompts(10)
    assert store.create_ranking_task(messages, cands, source_message_id=msg_id, source_created=stored) is not None


def test_an_idempotency_key_reused_for_another_target_is_a_conflict(store):
    """A retry returns the stored row; the same key for another message or task is no retry, and answering with the
    stored row would drop the new submission silently."""
    from flywheel.feedback.store import Conflict

    owner = "anon:abc12345"
    conv = store.create_conversation(owner)
    user = store.add_message(conv, owner, None, "user", "hi")
    a1 = store.add_message(conv, owner, user["id"], "assistant", "one", "v1", "stop")
    a2 = store.add_message(conv, owner, user["id"], "assistant", "two", "v1", "stop")
    store.vote(a1["id"], owner, 1, "", "key-1")
    assert store.vote(a1["id"], owner, 1, "", "key-1")[1] is False  # a retry
    with pytest.raises(Conflict, match="was used for message"):
        store.vote(a2["id"], owner, -1, "", "key-1")
    lab = store.create_user("lea", "labeler")
    lab_id = store.authenticate(lab).id
    t1, t2 = ranking_task(store), ranking_task(store)
    for tid, fails in ((t1, False), (t2, True)):
        ids = [c["id"] for c in store.task(tid, lab_id)["candidates"]]
        if fails:
            with pytest.raises(Conflict, match="was used for task"):
                store.submit_ranking(lab_id, tid, [[ids[0]], ids[1:]], key="r-1")
        else:
            store.submit_ranking(lab_id, tid, [[ids[0]], ids[1:]], key="r-1")


def test_a_delete_racing_writes_into_its_conversation_is_one_or_the_other(store):
    """Deleting a conversation while an answer is stored, a turn is added under its answer, or a vote is cast: each
    write happens before the delete (and goes with it) or finds nothing (404), never a 500, a deadlock or a turn-order
    error from a half-deleted branch (PostgreSQL: the conversation's row is locked by every write into it)."""
    import secrets
    import threading

    from flywheel.feedback.store import NotFound

    owner = "anon:racer123"
    for _ in range(8):
        conv = store.create_conversation(owner)
        user = store.add_user_turn(conv, owner, None, "hi")[-1]
        answer = store.add_message(conv, owner, user["id"], "assistant", "yo", "v1", "stop")
        errors: list[Exception] = []
        barrier = threading.Barrier(5)

        def run(job, barrier=barrier, errors=errors):
            barrier.wait()
            try:
                job()
            except NotFound:
                pass
            except Exception as err:  # noqa: BLE001 (collected: the test fails on any)
                errors.append(err)

        jobs = [
            lambda conv=conv: store.delete_conversation(conv, owner),
            lambda conv=conv, user=user: store.add_message(conv, owner, user["id"], "assistant", "more", "v1", "stop"),
            lambda conv=conv, answer=answer: store.add_user_turn(conv, owner, answer["id"], "next"),
            lambda answer=answer: store.vote(answer["id"], owner, 1, "", secrets.token_hex(8), owner=owner),
            lambda user=user: store.branch(user["id"], owner),
        ]
        threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with pytest.raises(NotFound):
            store.conversation(conv, owner)
