"""The container image (deploy/Dockerfile) is a multi-stage build with a
non-editable install, whose final stage runs as a non-root user and carries
only the built virtualenv. (No Docker daemon runs in CI, so these are checks
of the file; the compose and Kubernetes tests check how it is run.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_non_editable_install() -> None:
    """Two stages; the package is installed from the tree (`pip install ... .`),
    never editable; the final stage copies only the virtualenv from the first."""
    steps = instructions()
    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(froms) == 2, steps
    build, final = steps[froms[0] : froms[1]], steps[froms[1] :]
    runs = " ".join(args for word, args in build if word == "RUN")
    assert re.search(r"pip install --no-deps -c constraints.txt \.(\s|$)", runs), runs
    everything = " ".join(args for _, args in steps)
    assert not re.search(r"(\s-e\s|--editable)", everything), "editable install in the image"
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=build /opt/tokenledger /opt/tokenledger"], copies


def test_runs_as_a_numeric_non_root_user() -> None:
    """The final stage switches to uid 10001 (numeric, so Kubernetes' runAsNonRoot
    can check it) before its entry point, the `tokenledger` command."""
    steps = instructions()
    final = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][-1] :]
    users = [args for word, args in final if word == "USER"]
    assert users == ["10001:10001"], users
    assert ("ENTRYPOINT", '["tokenledger"]') in final


def test_build_context_leaves_local_state_out() -> None:
    """.dockerignore keeps the virtualenv, the embedded database and git out of the
    build context."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".data"} <= set(ignored)
