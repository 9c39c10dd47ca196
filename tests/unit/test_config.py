"""service/config.py: settings from the environment, and a former name read as
a deprecated alias of its new one."""

from __future__ import annotations

from structlog.testing import capture_logs

from service.cli.serve import warn_deprecated
from service.config import Config, deprecated_in


def test_background_enabled_is_read_from_its_name() -> None:
    """TOKENLEDGER_BACKGROUND_ENABLED switches the background tasks; on by default."""
    assert Config.from_env({}).background_enabled is True
    assert Config.from_env({"TOKENLEDGER_BACKGROUND_ENABLED": "false"}).background_enabled is False
    assert deprecated_in({"TOKENLEDGER_BACKGROUND_ENABLED": "false"}) == []


def test_the_former_name_still_switches_the_background_off() -> None:
    """TOKENLEDGER_SWEEPER_ENABLED is read as TOKENLEDGER_BACKGROUND_ENABLED, and named as
    deprecated."""
    env = {"TOKENLEDGER_SWEEPER_ENABLED": "false"}
    assert Config.from_env(env).background_enabled is False
    assert deprecated_in(env) == [("TOKENLEDGER_SWEEPER_ENABLED", "TOKENLEDGER_BACKGROUND_ENABLED")]


def test_the_new_name_wins_when_both_are_set() -> None:
    """With both names set, TOKENLEDGER_BACKGROUND_ENABLED decides, whichever way."""
    both = {"TOKENLEDGER_SWEEPER_ENABLED": "false", "TOKENLEDGER_BACKGROUND_ENABLED": "true"}
    assert Config.from_env(both).background_enabled is True
    both = {"TOKENLEDGER_SWEEPER_ENABLED": "true", "TOKENLEDGER_BACKGROUND_ENABLED": "false"}
    assert Config.from_env(both).background_enabled is False


def test_a_former_name_in_use_logs_a_warning() -> None:
    """Serving warns once per former name set, naming the one to use; none otherwise."""
    with capture_logs() as logs:
        warn_deprecated({"TOKENLEDGER_SWEEPER_ENABLED": "1"})
        warn_deprecated({"TOKENLEDGER_BACKGROUND_ENABLED": "1"})
    assert logs == [
        {
            "event": "deprecated_setting",
            "log_level": "warning",
            "setting": "TOKENLEDGER_SWEEPER_ENABLED",
            "use": "TOKENLEDGER_BACKGROUND_ENABLED",
        }
    ]


def test_no_prepared_statement_cache_behind_pgbouncer() -> None:
    """Behind pgbouncer the CLI's and the start-up migration's connections keep no
    prepared statements (the pooler may run the next statement elsewhere); else 100."""
    assert Config(db_pooler="pgbouncer").statement_cache_size() == 0
    assert Config().statement_cache_size() == 100
