"""The wheel carries what the service needs: `pip install` of it into a plain
venv, then `tokenledger migrate` and `tokenledger serve`, outside the source tree."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.process import free_port, new_admin_key, service_auth_env

REPO = Path(__file__).resolve().parent.parent


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(  # noqa: S603  # why: fixed tools with arguments the test built
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_wheel_in_a_plain_venv_migrates_and_serves(tmp_path: Path, database_url: str) -> None:
    """A wheel built from the tree (service/schema.sql is a link to the top-level schema.sql)
    holds the schema and the migrations: installed into a new venv and run from another
    directory, `tokenledger migrate` brings an empty database to the current version and
    `tokenledger serve` answers /readyz 200, then exits 0 on SIGTERM."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "schema.sql"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "service",
        src / "service",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    assert (src / "service" / "schema.sql").is_symlink()
    wheels = tmp_path / "wheels"
    # No build isolation: the pinned setuptools of the dev venv builds it, nothing is downloaded.
    _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", wheels, src, cwd=tmp_path,
    )  # fmt: skip
    wheel = next(wheels.glob("tokenledger-*.whl"))

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # The third-party packages come from the dev venv (a path, not its .pth files, so its
    # editable install of this project stays out of sight): the test needs no network.
    target = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                       cwd=tmp_path).strip())  # fmt: skip
    (target / "dev_venv_packages.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
         cwd=tmp_path)  # fmt: skip
    where = _run(python, "-c", "import service; print(service.__file__)", cwd=tmp_path)
    assert where.startswith(str(target)), where

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENLEDGER_", "PYTHON"))}
    env["DATABASE_URL"] = ""
    with_empty = env | {"DATABASE_URL": database_url}
    # The test database is a clone of the template: give the wheel an empty one instead.
    import asyncio

    import asyncpg

    async def reset() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    asyncio.run(reset())
    out = _run(venv / "bin" / "tokenledger", "migrate", cwd=tmp_path, env=with_empty)
    assert "applied schema.sql (fresh install)" in out and "current" in out, out

    port = free_port()
    serve_env = (
        with_empty
        | service_auth_env(new_admin_key())
        | {
            "TOKENLEDGER_PORT": str(port),
            "TOKENLEDGER_WORKERS": "1",
        }
    )
    proc = subprocess.Popen(  # noqa: S603  # why: the console script the wheel installed
        [str(venv / "bin" / "tokenledger"), "serve"],
        cwd=tmp_path,
        env=serve_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, proc.stdout.read().decode() if proc.poll() is not None else status
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
