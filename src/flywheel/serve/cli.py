"""`flywheel serve MODEL_DIR`: the OpenAI-compatible API, the chat web app and the labelers' workbench.

    flywheel serve runs/sft/final                                  # http://127.0.0.1:8000, SQLite feedback.db
    flywheel serve runs/sft/final --db postgresql+psycopg://u@localhost/flywheel --port 8080 --chat-auth

See docs/serve.md. Users and tokens: `flywheel db create-user NAME --role user|labeler|admin`, `flywheel db
rotate-token NAME`, `flywheel db revoke-token NAME`.
"""

from __future__ import annotations

from flywheel.config import parse_config
from flywheel.serve.app import ServeSettings


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from flywheel.serve.app import create_app, uvicorn_options

    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    settings = parse_config(ServeSettings, argv, "flywheel serve", __doc__.splitlines()[0])
    app = create_app(settings)
    print(f"flywheel serve: http://{settings.host}:{settings.port}/ (chat), /label, /admin, /v1", flush=True)
    # access_log off: request lines would carry query strings; errors are still logged (never with tokens).
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="info", access_log=False, **uvicorn_options(settings)
    )
    return 0
