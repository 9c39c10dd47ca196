"""The `tokenledger` command (also `python -m service`).

tokenledger [serve]        run the HTTP service (the default)
tokenledger audit          check the ledger invariants; exit 1 naming the first violation
                           (routine: what came after each check's checkpoint)
  --full                   check all history again, not only what came after the checkpoints
  --verify-chain           also verify the hash chain and print its head (README, Tamper evidence)
tokenledger migrate        bring the database to this release (pending migrations, then schema.sql)
  --check                  change nothing; exit 0 when current, 1 when behind (a readiness gate)
tokenledger sweep          write due expiry transactions once, then exit
tokenledger chain          append settled transactions to the hash chain once, then exit
tokenledger prices import FILE  add price versions from a LiteLLM-format price map
tokenledger import employees FILE.csv  create or update employees from a CSV (progress bar)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from service import db
from service.cli import importing, keys, ledger
from service.cli.args import database_url
from service.cli.serve import serve
from service.config import Config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the HTTP service (default)")
    ledger.add_parsers(sub)
    keys.add_parser(sub)
    importing.add_parsers(sub)
    args = parser.parse_args(argv)
    config = Config.from_env()
    # Commands run several statements outside a transaction: behind
    # pgbouncer none may rely on a prepared statement kept between them.
    db.connect_statement_cache_size = config.statement_cache_size()
    command = args.command or "serve"
    if command == "serve":
        return serve(config)
    url = database_url(args, config)
    if command == "keys":
        return asyncio.run(keys.run(url, args))
    if command == "prices":
        return importing.import_prices(url, args, config)
    if command == "import":
        return importing.import_employees(url, args, config)
    return ledger.run(command, url, args, config)
