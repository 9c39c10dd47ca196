"""The compose stack (deploy/docker-compose.yml) is a valid compose file
whose replicas start in production mode, and every file it mounts exists.

`docker compose config` checks it where Docker's compose plugin answers;
elsewhere (CI has no Docker) the file is validated against the compose-spec
JSON schema packaged in deploy/schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from service.app import create_app
from service.config import Config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def docker_compose_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    done = subprocess.run(  # noqa: S603  # why: a fixed command line
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60
    )
    return done.returncode == 0


def interpolated(value: str) -> str:
    """What compose makes of ${VAR:-default} with VAR unset: the default."""
    assert "${" not in re.sub(r"\$\{[A-Z0-9_]+:-[^}]*\}", "", value), value
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_file_is_valid() -> None:
    """docker compose config accepts the file, or (without Docker) the compose-spec
    schema does."""
    if docker_compose_answers():
        docker = shutil.which("docker")
        assert docker
        done = subprocess.run(  # noqa: S603  # why: a fixed command line
            [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        print("validated with docker compose config")
        return
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # The schema does catch mistakes (a misspelled key fails).
    broken = compose()
    broken["services"]["proxy"]["restrat"] = "always"
    assert list(validator.iter_errors(broken))
    print("docker compose is not available: validated against deploy/schemas/compose-spec.json")


def test_stack_has_every_part() -> None:
    """PostgreSQL, a migrate step, two replicas behind a proxy, Prometheus and Grafana;
    the replicas wait for the migration, which waits for the database."""
    services = compose()["services"]
    assert set(services) == {
        "postgres",
        "migrate",
        "service-1",
        "service-2",
        "proxy",
        "prometheus",
        "grafana",
    }
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("service-1", "service-2"):
        replica = services[name]
        assert replica["command"] == ["serve"]
        assert replica["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "/readyz" in " ".join(replica["healthcheck"]["test"])
        assert replica["read_only"] is True
    nginx = (DEPLOY / "proxy" / "nginx.conf").read_text()
    assert re.findall(r"server (service-\d):8000", nginx) == ["service-1", "service-2"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["service-1:8000", "service-2:8000"]
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_every_mounted_file_exists() -> None:
    """Each ./ bind mount of the compose file names a file or folder in deploy/, and
    Grafana's dashboard provider reads the folder the dashboards are mounted at."""
    mounts: dict[str, str] = {}
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
                mounts[target] = source
    assert mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "tokenledger.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == "./grafana/dashboards"
    assert (DEPLOY / "grafana" / "dashboards" / "tokenledger.json").exists()


def test_replicas_start_in_production_mode() -> None:
    """The replicas' environment (defaults filled in) is a production config with
    employee-token verification and a strong bootstrap key, which create_app accepts
    (without them the service refuses to start and compose restarts it for ever)."""
    replica = compose()["services"]["service-1"]
    env = {name: interpolated(str(value)) for name, value in replica["environment"].items()}
    config = Config.from_env(env)
    assert config.environment == "production"
    assert config.bootstrap_admin_key
    assert config.database_url and "@postgres:5432/" in config.database_url
    assert config.apply_schema is False
    create_app(config)  # raises when production lacks JWT settings or the key is weak
