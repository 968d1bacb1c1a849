"""The store on SQLite and on a real PostgreSQL: typed reads, atomic partition replacement."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.contracts import ContractError
from meta_pipeline.store import MetaStore


def _lessons(domain: str, n: int, edge: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "domain": domain,
            "lesson_key": [f"P{i}|" for i in range(n)],
            "pattern": [f"P{i}" for i in range(n)],
            "scope_json": "{}",
            "n_scope_keys": 0,
            "n": np.arange(n) + 30,
            "edge_mean": edge,
            "edge_std": 1.0,
            "edge_se": 0.1,
            "edge_lcb": edge - 0.1,
            "first_seen": pd.Timestamp("2026-01-01T00:00:00Z"),
            "last_seen": pd.Timestamp("2026-02-01T12:30:00Z"),
        }
    )


def test_replace_partition_is_idempotent_and_scoped(any_store: MetaStore) -> None:
    any_store.replace_partition("learning_lessons", "a", _lessons("a", 5, 0.1))
    any_store.replace_partition("learning_lessons", "b", _lessons("b", 3, 0.2))
    any_store.replace_partition("learning_lessons", "a", _lessons("a", 4, 0.3))
    any_store.replace_partition("learning_lessons", "a", _lessons("a", 4, 0.3))
    a = any_store.read("learning_lessons", domain="a")
    b = any_store.read("learning_lessons", domain="b")
    assert len(a) == 4 and np.allclose(a["edge_mean"], 0.3)
    assert len(b) == 3 and np.allclose(b["edge_mean"], 0.2)  # the other domain untouched
    # typed read: UTC timestamps, exact values round-trip
    assert str(a["first_seen"].dt.tz) == "UTC"
    assert a["last_seen"].iloc[0] == pd.Timestamp("2026-02-01T12:30:00Z")
    assert a["n"].dtype == np.int64


def test_failed_replace_leaves_previous_rows(any_store: MetaStore) -> None:
    any_store.replace_partition("learning_lessons", "a", _lessons("a", 5, 0.1))
    bad = _lessons("a", 6, 0.9)
    bad.loc[4, "edge_mean"] = np.inf  # rejected by the insert, after the delete ran
    with pytest.raises(ValueError, match="non-finite"):
        any_store.replace_partition("learning_lessons", "a", bad)
    bad = _lessons("a", 6, 0.9)
    bad.loc[5, "pattern"] = None  # null in a non-null column
    with pytest.raises(ValueError, match="null"):
        any_store.replace_partition("learning_lessons", "a", bad)
    kept = any_store.read("learning_lessons", domain="a")
    assert len(kept) == 5 and np.allclose(kept["edge_mean"], 0.1)


def test_crash_inside_transaction_rolls_back(any_store: MetaStore) -> None:
    any_store.replace_partition("learning_lessons", "a", _lessons("a", 5, 0.1))
    with pytest.raises(RuntimeError, match="boom"):
        with any_store.write() as conn:
            any_store.replace_partition("learning_lessons", "a", _lessons("a", 2, 0.7), conn=conn)
            raise RuntimeError("boom")  # e.g. the process dies between two tables
    assert len(any_store.read("learning_lessons", domain="a")) == 5


def test_append_only_tables_refuse_replacement(any_store: MetaStore) -> None:
    with pytest.raises(ValueError, match="append-only"):
        any_store.replace_partition("meta_decisions", "a", pd.DataFrame())


@pytest.mark.parametrize("name", ["../x", "a;drop table trades", "", "x" * 200, "Upper", "-lead", "nul\x00byte", "white space"])
def test_hostile_domain_names_never_reach_sql(store: MetaStore, name) -> None:
    with pytest.raises(ContractError, match="invalid domain name"):
        store.read("trades", domain=name)
    with pytest.raises(ContractError, match="invalid domain name"):
        store.replace_partition("learning_lessons", name, _lessons("a", 1, 0.1).drop(columns="domain"))
    assert store.count("learning_lessons") == 0


def test_rows_for_another_domain_are_refused(store: MetaStore) -> None:
    with pytest.raises(ValueError, match="other domains"):
        store.replace_partition("learning_lessons", "a", _lessons("b", 2, 0.1))


def test_concurrent_writers_queue_instead_of_failing(any_store: MetaStore) -> None:
    errors: list[BaseException] = []

    def writer(domain: str, edge: float) -> None:
        try:
            for _ in range(10):
                any_store.replace_partition("learning_lessons", domain, _lessons(domain, 50, edge))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(d, e)) for d, e in (("a", 0.1), ("b", 0.2), ("a", 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a = any_store.read("learning_lessons", domain="a")
    assert len(a) == 50 and a["edge_mean"].nunique() == 1  # one writer's whole partition, never a mix
    assert len(any_store.read("learning_lessons", domain="b")) == 50


def test_an_older_store_gains_new_nullable_columns(tmp_path) -> None:
    import sqlite3

    from meta_pipeline.store import dispose_engines

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)  # controller_state as an older version created it
    con.execute("CREATE TABLE controller_state (domain VARCHAR(63) NOT NULL, knobs_json TEXT NOT NULL, "
                "cooldowns_json TEXT NOT NULL, reward_ema FLOAT, rollbacks INTEGER NOT NULL, decisions INTEGER NOT NULL, "
                "updated_at DATETIME NOT NULL, state_json TEXT, last_ts DATETIME)")
    con.execute("INSERT INTO controller_state VALUES ('a', '{}', '{}', 0.5, 0, 3, '2026-01-01 00:00:00.000000', NULL, NULL)")
    con.commit()
    con.close()
    dispose_engines()
    store = MetaStore(db_url=f"sqlite:///{path}")
    row = store.read("controller_state", domain="a")
    assert len(row) == 1 and "config_version" in row.columns and row["config_version"].isna().all()


def _pattern_rows(domain: str, values: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"trade_id": [f"t{i}" for i in range(len(values))], "pattern": values}).assign(domain=domain)


def test_text_reads_in_one_blob_equal_row_by_row_and_fall_back_on_separators(store: MetaStore, monkeypatch) -> None:
    import meta_pipeline.store.frames as store_mod

    clean = ["F0.buy_flag", "", "é ünïcode", "tab\there", "x" * 200] * 40
    dirty = ["a\x1fb", "line\nbreak", "cr\rhere", "\x1f\n"] + clean[:6]
    store.replace_partition("trade_patterns", "clean", _pattern_rows("clean", clean))
    store.replace_partition("trade_patterns", "dirty", _pattern_rows("dirty", dirty))
    row_by_row = []
    real = store_mod._query_frame
    monkeypatch.setattr(store_mod, "_query_frame", lambda *a, **k: row_by_row.append(a[1]) or real(*a, **k))

    got = store.read("trade_patterns", domain="clean", columns=["trade_id", "pattern"])
    assert row_by_row == []  # the fast path served it
    assert sorted(zip(got["trade_id"], got["pattern"])) == sorted(zip([f"t{i}" for i in range(len(clean))], clean))
    assert got["pattern"].dtype == store_mod._TEXT_DTYPE

    got = store.read("trade_patterns", domain="dirty", columns=["trade_id", "pattern"])
    assert len(row_by_row) == 1  # a separator inside a value: read row by row, nothing split or lost
    assert sorted(zip(got["trade_id"], got["pattern"])) == sorted(zip([f"t{i}" for i in range(len(dirty))], dirty))

    assert store.read("trade_patterns", domain="nobody", columns=["trade_id", "pattern"]).empty


def test_long_source_tables_are_keyed_by_trade_and_name(any_store: MetaStore) -> None:
    rows = _pattern_rows("a", ["p", "q"])
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        any_store.replace_partition("trade_patterns", "a", pd.concat([rows, rows.iloc[:1]]))
    assert any_store.read("trade_patterns", domain="a").empty  # the failed replace wrote nothing


def test_nullable_integer_columns_insert_as_integers_on_both_databases(any_store) -> None:
    """A nullable Int64 column (e.g. diagnostics.n) lands as integers; PostgreSQL's COPY refused '5117.0'."""
    rows = pd.DataFrame({"section": ["s", "s"], "subject": ["a", "b"], "metric": ["m", "m"], "value": [1.0, 2.0],
                         "n": pd.array([5117, None], dtype="Int64")})
    any_store.replace_partition("diagnostics", "d", rows)
    got = any_store.read("diagnostics", domain="d", order_by="subject")
    assert got["n"].tolist()[0] == 5117 and pd.isna(got["n"].tolist()[1])


def test_not_null_reads_in_chunks_equal_one_fetch_and_fall_back_on_a_refused_chunk(store: MetaStore, monkeypatch) -> None:
    """The NOT NULL fast path converts FETCH_CHUNK_ROWS rows at a time (bounded tuple memory): the same
    frame as one fetch; a chunk it refuses (a text value in a float column, which SQLite keeps) sends the
    whole read down the general path, nothing lost."""
    import sqlite3

    import meta_pipeline.store.frames as store_mod

    rows = pd.DataFrame({"trade_id": [f"t{i}" for i in range(10)], "metric": "m", "value": np.arange(10) / 3})
    store.replace_partition("trade_metrics", "d", rows)
    cols = ["trade_id", "metric", "value"]
    whole = store.read("trade_metrics", domain="d", columns=cols)
    monkeypatch.setattr(store_mod, "FETCH_CHUNK_ROWS", 3)
    chunked = store.read("trade_metrics", domain="d", columns=cols)
    pd.testing.assert_frame_equal(chunked, whole, check_exact=True)
    con = sqlite3.connect(store.engine.url.database)
    con.execute("INSERT INTO trade_metrics (domain, trade_id, metric, value) VALUES ('d', 'z9', 'm', 'oops')")
    con.commit()
    con.close()
    general = store.read("trade_metrics", domain="d", columns=cols)
    assert len(general) == 11 and general["value"].isna().sum() == 1  # read, not dropped; the text is no number
