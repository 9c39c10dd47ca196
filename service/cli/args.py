"""What the commands' arguments share: the database URL and positive numbers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from service.config import Config


def url_option() -> argparse.ArgumentParser:
    """A parent parser with --database-url, for every command that opens the database."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--database-url", help="defaults to DATABASE_URL")
    return parent


def database_url(args: argparse.Namespace, config: Config) -> str:
    url = getattr(args, "database_url", None) or config.database_url
    if not url:
        sys.exit("tokenledger: DATABASE_URL is not set (or pass --database-url)")
    return url


def positive_int(message: str) -> Callable[[str], int]:
    """An argument type for a whole number of at least 1; `message` (with {!r}
    for the text given) says what else was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(message.format(text))
        return value

    return parse
