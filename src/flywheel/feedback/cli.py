"""`flywheel db`: the feedback database's schema, users and their tokens.

flywheel db upgrade --db feedback.db                          # create / migrate the schema (alembic upgrade head)
flywheel db create-user alice --role labeler --db feedback.db # prints alice's API token (shown only once)
flywheel db users --db feedback.db                            # list users, roles and whether their token works
flywheel db revoke-token alice --db feedback.db               # alice's token stops working at once
flywheel db rotate-token alice --db feedback.db               # prints a new token; the old one stops working

`upgrade` and `create-user` create a SQLite database that does not exist yet; the other actions need an existing one.

Roles: `user` (chat, for `flywheel serve --chat-auth true`), `labeler` (chat and the workbench), `admin` (everything).
"""

from __future__ import annotations

import argparse

from flywheel.feedback.models import ROLES


def main(argv: list[str] | None = None) -> int:
    from flywheel.feedback.db import require_database, upgrade
    from flywheel.feedback.store import Store

    parser = argparse.ArgumentParser(
        prog="flywheel db", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("upgrade", help="create or migrate the schema to the latest revision")
    create = sub.add_parser("create-user", help="add a user and print their API token")
    create.add_argument("name")
    create.add_argument("--role", choices=ROLES, default="labeler")
    users = sub.add_parser("users", help="list users")
    revoke = sub.add_parser("revoke-token", help="revoke a user's token (their data stays)")
    revoke.add_argument("name")
    rotate = sub.add_parser("rotate-token", help="give a user a new token and print it (the old one stops working)")
    rotate.add_argument("name")
    for p in (up, create, users, revoke, rotate):
        p.add_argument("--db", default="feedback.db", help="database URL or SQLite file (default: feedback.db)")
    args = parser.parse_args(argv)
    if args.action in ("users", "revoke-token", "rotate-token"):
        require_database(args.db)  # a mistyped path is an error, not a new empty database
    upgrade(args.db)
    if args.action == "upgrade":
        return 0
    store = Store(args.db)
    try:
        if args.action == "create-user":
            print(store.create_user(args.name, args.role))
        elif args.action == "rotate-token":
            print(store.rotate_token(args.name))
        elif args.action == "revoke-token":
            store.revoke_token(args.name)
        else:
            for user in store.users():
                print(f"{user.name}\t{user.role}\t{'active' if user.active else 'revoked'}")
    finally:
        store.close()
    return 0
