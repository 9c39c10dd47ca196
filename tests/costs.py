"""The expected cost of usage events, from the one pricing implementation:
`tl_usage_cost` in schema.sql (README, Prices). Tests that need an expected
cost ask the database for it instead of keeping a second formula in Python."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from service.pricing import PriceRates

# Every event's cost at one price version, in one statement: the rates are
# made into a `prices` row of a version that need not be stored.
_COSTS = """
SELECT tl_usage_cost(p, c.input, c.cached, c.output)
FROM jsonb_populate_record(NULL::prices, jsonb_build_object(
         'id', gen_random_uuid(), 'input_per_mtok', $1::bigint,
         'cached_input_per_mtok', $2::bigint, 'output_per_mtok', $3::bigint)) p,
     unnest($4::bigint[], $5::bigint[], $6::bigint[]) WITH ORDINALITY AS c(input, cached, output, n)
ORDER BY c.n
"""


async def usage_costs(
    database_url: str, rates: PriceRates, counts: Sequence[tuple[int, int, int]]
) -> list[int]:
    """The credits of each (input, cached input, output) token count at `rates`."""
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        return await sql_costs(conn, rates, counts)
    finally:
        await conn.close(timeout=30)


async def sql_costs(
    conn: asyncpg.Connection, rates: PriceRates, counts: Sequence[tuple[int, int, int]]
) -> list[int]:
    """usage_costs on a connection the caller has."""
    rows = await conn.fetch(
        _COSTS,
        rates.input_per_mtok,
        rates.cached_input_per_mtok,
        rates.output_per_mtok,
        [c[0] for c in counts],
        [c[1] for c in counts],
        [c[2] for c in counts],
    )
    return [int(r[0]) for r in rows]
