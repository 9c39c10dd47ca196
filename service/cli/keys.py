"""`tokenledger keys`: create, scope, list and revoke service keys."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service import db
from service.cli.args import positive_int, url_option


def add_parser(sub: Any) -> None:
    """keys and its subcommands."""
    keys = sub.add_parser("keys", help="manage service keys")
    url_arg = url_option()
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    scopes = argparse.ArgumentParser(add_help=False)
    scopes.add_argument(
        "--sources", type=_scope_list, default=None, help="usage sources it may send (comma list)"
    )
    scopes.add_argument(
        "--account-types",
        type=_account_types,
        default=None,
        help="account types it may charge: employee, department (comma list)",
    )
    scopes.add_argument(
        "--departments",
        type=_scope_list,
        default=None,
        help="departments whose accounts it may charge: their employees' wallets and the"
        " department accounts (comma list)",
    )
    scopes.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=None,
        help="most credits it may spend per minute (debits, reservations, usage)",
    )
    create = keys_sub.add_parser(
        "create", parents=[url_arg, scopes], help="create a key and print its secret once"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=["admin", "hr", "finance", "meter"])
    create.add_argument("--created-by", default=None, help="who asked for it (recorded)")
    keys_sub.add_parser(
        "scope",
        parents=[url_arg, scopes],
        help="set a key's scopes (an omitted scope becomes unrestricted)",
    ).add_argument("key")
    keys_sub.add_parser("list", parents=[url_arg], help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", parents=[url_arg], help="revoke a key by id or prefix")
    revoke.add_argument("key")


# --rate-limit: a whole number of credits per minute.
_rate_limit = positive_int("a rate limit is a positive number of credits, not {!r}")


def _scope(values: list[str] | None) -> str:
    return "any" if values is None else ",".join(values) or "none"


def _scope_list(text: str) -> list[str]:
    """A comma list for a key scope; "" allows nothing."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _account_types(text: str) -> list[str]:
    kinds = _scope_list(text)
    unknown = set(kinds) - {"employee", "department"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown account types {sorted(unknown)}")
    return kinds


async def run(url: str, args: argparse.Namespace) -> int:
    from service.auth import new_key

    conn = await db.connect(url)
    queries = db.load_queries()
    try:
        if args.keys_command == "create":
            key = new_key()
            row = await conn.fetchrow(
                queries["create_key"],
                key.id,
                key.prefix,
                key.secret_hash,
                args.name,
                args.role,
                args.created_by,
            )
            assert row is not None
            if args.sources is not None or args.account_types is not None:
                await conn.fetchrow(
                    queries["set_key_scopes"], str(key.id), args.sources, args.account_types
                )
            if args.departments is not None or args.rate_limit is not None:
                await conn.fetchrow(
                    queries["set_key_limits"], str(key.id), args.departments, args.rate_limit
                )
            print(f"created key {row['id']} ({row['name']}, role {row['role']})", file=sys.stderr)
            print("the secret is shown once; store it now:", file=sys.stderr)
            print(key.secret)
        elif args.keys_command == "list":
            for r in await conn.fetch(queries["list_keys"]):
                state = f"revoked {r['revoked_at']:%Y-%m-%d}" if r["revoked_at"] else "active"
                used = f"{r['last_used_at']:%Y-%m-%d %H:%M}" if r["last_used_at"] else "never"
                key_id = f"{r['id']}  tlk_{r['prefix']}_…"
                print(f"{key_id}  {r['role']:8} {state:18} used {used:16} {r['name']}")
        elif args.keys_command == "scope":
            async with conn.transaction():
                row = await conn.fetchrow(
                    queries["set_key_scopes"], args.key, args.sources, args.account_types
                )
                limits = await conn.fetchrow(
                    queries["set_key_limits"], args.key, args.departments, args.rate_limit
                )
            if row is None or limits is None:
                print(f"no active key {args.key}", file=sys.stderr)
                return 1
            rate = "any" if limits["rate_limit"] is None else f"{limits['rate_limit']}/min"
            print(
                f"{row['id']} ({row['name']}): sources {_scope(row['sources'])}, "
                f"account types {_scope(row['account_types'])}, "
                f"departments {_scope(limits['departments'])}, credits {rate}"
            )
        elif args.keys_command == "revoke":
            row = await conn.fetchrow(queries["revoke_key"], args.key)
            if row is None:
                print(f"no key {args.key}", file=sys.stderr)
                return 1
            print(f"revoked {row['id']} ({row['name']}) at {row['revoked_at']}")
    finally:
        await conn.close()
    return 0
