"""The items a report streams and pages (structs, service/reports.py _streamed) are
written exactly as the dicts the whole list keeps (_items)."""

from __future__ import annotations

import msgspec

from service.reports import TOTALS, _items, _streamed, sql_keys, to_csv


def test_streamed_items_write_the_same_json_and_csv_as_dicts() -> None:
    """Same JSON bytes (names, their order, nulls), same CSV bytes (formulas
    neutralised, quoting), and each value read back by its column's name, a tag
    key's name (no identifier) included."""
    keys = ("tag:team", "employee", "day")
    names = sql_keys(keys)
    values = [
        ("core", "e-1", "2026-03-01"),
        (None, "e-2", None),
        ('=HYPERLINK("x")', "e,3", 'say "hi"\nthere'),
    ]
    rows = [
        {**dict(zip(names, v, strict=True)), **{t: n * 10 + i for i, t in enumerate(TOTALS)}}
        for n, v in enumerate(values)
    ]
    as_dicts, streamed = _items(keys, rows), _streamed(keys, rows)
    assert msgspec.json.encode(streamed) == msgspec.json.encode(as_dicts)
    assert list(msgspec.json.decode(msgspec.json.encode(streamed))[0]) == [*keys, *TOTALS]
    assert to_csv(keys, streamed) == to_csv(keys, as_dicts)
    assert to_csv(keys, streamed, header=False) == to_csv(keys, as_dicts, header=False)
    assert [[i[c] for c in (*keys, *TOTALS)] for i in streamed] == [
        list(d.values()) for d in as_dicts
    ]
