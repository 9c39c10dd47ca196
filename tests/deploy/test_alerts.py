"""Alert rules (deploy/prometheus/alerts.yml): promtool accepts them and
every rule passes its unit tests (alerts_test.yml), each rule with a case
where it fires."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    """The promtool binary; a missing one fails the test (it is no reason to skip)."""
    path = shutil.which("promtool")
    assert path, (
        "promtool is missing: install Debian's prometheus package "
        "(apt-get install prometheus; .ci/run does it when missing)"
    )
    return path


def run(*args: str) -> str:
    done = subprocess.run(  # noqa: S603  # why: promtool with our own file names
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid() -> None:
    """promtool check rules accepts alerts.yml."""
    assert "SUCCESS" in run("check", "rules", "alerts.yml")


def test_rules_pass_their_unit_tests() -> None:
    """promtool test rules passes every case of alerts_test.yml."""
    assert "SUCCESS" in run("test", "rules", "alerts_test.yml")


def test_every_rule_has_a_firing_case() -> None:
    """Each alert of alerts.yml is expected to fire in at least one test case, and
    each has a runbook entry in docs/runbook.md."""
    rules = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    fired = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert rules - fired == set(), f"rules with no firing test case: {sorted(rules - fired)}"
    assert {
        "TokenledgerChainLagging",
        "TokenledgerBackgroundErrors",
        "TokenledgerOutboxLagging",
        "TokenledgerHigh5xxRate",
        "TokenledgerPoolExhausted",
    } <= rules
    runbook = (PROMETHEUS.parents[1] / "docs" / "runbook.md").read_text()
    for rule in sorted(rules):
        assert f"### {rule}" in runbook, f"docs/runbook.md has no section for {rule}"


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    """promtool check config accepts the compose stack's prometheus.yml, with its rule
    file (mounted at /etc/prometheus/alerts.yml in the container) found here."""
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert "/etc/prometheus/alerts.yml" in config
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/alerts.yml", str(PROMETHEUS / "alerts.yml")))
    rules = sum(
        len(group["rules"])
        for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    )
    out = run("check", "config", str(local))
    assert "SUCCESS" in out and f"{rules} rules found" in out, out
