"""The feedback database: users and tokens, chat trees, labeling tasks, rankings, demonstrations, votes, and the
export to the trainers' datasets. `flywheel db upgrade|create-user|users|revoke-token|rotate-token`, `flywheel export`;
docs/serve.md."""
