"""`flywheel db`: the feedback database's schema and users.

flywheel db upgrade --db feedback.db                         # create / migrate the schema (alembic upgrade head)
flywheel db create-user alice --role labeler --db feedback.db   # prints alice's API token (shown only once)
flywheel db users --db feedback.db                           # list users and roles
"""

from __future__ import annotations

import argparse

from flywheel.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from flywheel.feedback.db import upgrade
    from flywheel.feedback.store import Store

    parser = argparse.ArgumentParser(prog="flywheel db", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("upgrade", help="create or migrate the schema to the latest revision")
    up.add_argument("--db", default="feedback.db", help="database URL or SQLite file (default: feedback.db)")
    create = sub.add_parser("create-user", help="add a user and print their API token")
    create.add_argument("name")
    create.add_argument("--role", choices=["labeler", "admin"], default="labeler")
    create.add_argument("--db", default="feedback.db", help="database URL or SQLite file (default: feedback.db)")
    users = sub.add_parser("users", help="list users")
    users.add_argument("--db", default="feedback.db", help="database URL or SQLite file (default: feedback.db)")
    args = parser.parse_args(argv)
    upgrade(args.db)
    if args.action == "upgrade":
        return 0
    store = Store(args.db)
    try:
        if args.action == "create-user":
            token = store.create_user(args.name, args.role)
            print(token)
        else:
            for user in store.users():
                print(f"{user.name}\t{user.role}")
    except UserError:
        raise
    finally:
        store.close()
    return 0
