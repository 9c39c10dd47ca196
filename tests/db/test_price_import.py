"""`tokenledger prices import`: a LiteLLM-format price map becomes price versions, once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "prices.example.json"
EXAMPLE_MODELS = [
    "claude-3-5-haiku-20241022",
    "claude-3-5-sonnet-20241022",
    "gemini/gemini-1.5-pro",
    "gpt-4o",
    "gpt-4o-mini",
    "o3-mini",
    "text-embedding-3-small",
]


def run_import(path: Path, database_url: str, *extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    done = subprocess.run(  # noqa: S603  # why: our own CLI, fixed arguments
        [sys.executable, "-m", "service", "prices", "import", str(path)]
        + ["--database-url", database_url, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


async def test_import_twice_then_a_changed_file(
    db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    """The example adds a version per model; again adds nothing; a changed copy adds the changes."""
    first = run_import(EXAMPLE, database_url)
    assert first[-1] == "7 added, 0 unchanged, 1 skipped (1000000 credits per USD)"
    assert [line.split()[1] for line in first if line.startswith("added ")] == EXAMPLE_MODELS
    assert "skipped dall-e-3: no input_cost_per_token or output_cost_per_token" in first
    rows = await db.fetch(
        "SELECT model, tier, input_per_mtok, cached_input_per_mtok, output_per_mtok, source"
        " FROM prices ORDER BY model"
    )
    assert [tuple(r) for r in rows] == [
        (
            "claude-3-5-haiku-20241022",
            "standard",
            800_000,
            80_000,
            4_000_000,
            "import:prices.example.json",
        ),
        (
            "claude-3-5-sonnet-20241022",
            "standard",
            3_000_000,
            300_000,
            15_000_000,
            "import:prices.example.json",
        ),
        (
            "gemini/gemini-1.5-pro",
            "standard",
            1_250_000,
            1_250_000,
            5_000_000,
            "import:prices.example.json",
        ),
        ("gpt-4o", "standard", 2_500_000, 1_250_000, 10_000_000, "import:prices.example.json"),
        ("gpt-4o-mini", "standard", 150_000, 75_000, 600_000, "import:prices.example.json"),
        ("o3-mini", "standard", 1_100_000, 550_000, 4_400_000, "import:prices.example.json"),
        ("text-embedding-3-small", "standard", 20_000, 20_000, 0, "import:prices.example.json"),
    ]

    second = run_import(EXAMPLE, database_url)
    assert second[-1] == "0 added, 7 unchanged, 1 skipped (1000000 credits per USD)"
    assert await db.fetchval("SELECT count(*) FROM prices") == 7

    changed = json.loads(EXAMPLE.read_text())
    changed["gpt-4o"]["output_cost_per_token"] = 8e-06
    changed["o3-mini"]["cache_read_input_token_cost"] = 2.75e-07
    changed["new-model"] = {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}
    copy = tmp_path / "changed.json"
    copy.write_text(json.dumps(changed))
    third = run_import(copy, database_url, "--effective-from", "2030-01-01T00:00:00Z")
    assert third[-1] == "3 added, 5 unchanged, 1 skipped (1000000 credits per USD)"
    assert [line.split()[1] for line in third if line.startswith("added ")] == [
        "gpt-4o",
        "new-model",
        "o3-mini",
    ]
    versions = await db.fetch(
        "SELECT model, effective_from = '2030-01-01T00:00:00Z' AS later, output_per_mtok,"
        " cached_input_per_mtok FROM prices WHERE model IN ('gpt-4o', 'o3-mini', 'new-model')"
        " ORDER BY model, effective_from"
    )
    assert [tuple(r) for r in versions] == [
        ("gpt-4o", False, 10_000_000, 1_250_000),
        ("gpt-4o", True, 8_000_000, 1_250_000),
        ("new-model", True, 2_000_000, 1_000_000),
        ("o3-mini", False, 4_400_000, 550_000),
        ("o3-mini", True, 4_400_000, 275_000),
    ]
    # The same changed file again, at the same instant, adds nothing either.
    fourth = run_import(copy, database_url, "--effective-from", "2030-01-01T00:00:00Z")
    assert fourth[-1] == "0 added, 8 unchanged, 1 skipped (1000000 credits per USD)"


def test_credits_per_usd_scales_the_rates(database_url: str) -> None:
    """--credits-per-usd 1000 makes gpt-4o's 2.5e-6 USD/token 2500 credits per Mtok."""
    out = run_import(EXAMPLE, database_url, "--credits-per-usd", "1000")
    assert out[-1] == "7 added, 0 unchanged, 1 skipped (1000 credits per USD)"
    gpt = next(line for line in out if line.startswith("added gpt-4o "))
    assert re.fullmatch(
        r"added gpt-4o prc_[0-9a-f]{32}: input 2500, cached input 1250, output 10000 "
        r"credits/Mtok from \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z",
        gpt,
    ), gpt
