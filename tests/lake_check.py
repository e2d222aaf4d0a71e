"""Reads the lake the way analysts do, with DuckDB and pyarrow, and checks it against
what the test posted. Called by tests/lake.rs with the venv's python:

    lake_check.py LAKE_DIR EXPECTED_JSON DDL_FILE
    lake_check.py dump LAKE_DIR
    lake_check.py ids LAKE_DIR TABLE

EXPECTED_JSON maps each table to its accepted event ids. Prints one JSON line of figures;
exits non-zero with a message on the first mismatch.
"""
import json
import re
import sys

import duckdb
import pyarrow.dataset as ds
import sqlglot

if sys.argv[1] == "dump":
    # `lake_check.py dump LAKE_DIR`: the lake's files and a digest of all its rows.
    import hashlib
    import pathlib
    lake = sys.argv[2]
    root = pathlib.Path(lake)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))
    digest = hashlib.sha256()
    con = duckdb.connect()
    counts = {}
    per_table = {}
    for table in sorted({f.split("/")[0] for f in files}):
        rows = con.execute(
            f"select cast(t as varchar) as r from read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning = true, union_by_name = true) t order by r"
        ).fetchall()
        counts[table] = len(rows)
        t = hashlib.sha256()
        for (r,) in rows:
            digest.update(r.encode())
            digest.update(b"\n")
            t.update(r.encode())
        per_table[table] = t.hexdigest()[:12]
    print(json.dumps({"files": files, "rows": counts, "digest": digest.hexdigest(), "tables": per_table}))
    sys.exit(0)

if sys.argv[1] == "ids":
    # `lake_check.py ids LAKE_DIR TABLE`: every event_id of TABLE (repeats kept) and its
    # number of files, each file read on its own so that an unreadable one is named.
    import pathlib
    con = duckdb.connect()
    ids, files = [], 0
    for path in sorted((pathlib.Path(sys.argv[2]) / sys.argv[3]).rglob("*.parquet")):
        try:
            ids += [r[0] for r in con.execute(f"select event_id from read_parquet('{path}')").fetchall()]
        except Exception as e:
            print(f"unreadable lake file {path}: {e}", file=sys.stderr)
            sys.exit(1)
        files += 1
    print(json.dumps({"ids": ids, "files": files}))
    sys.exit(0)

lake, expected_path, ddl_path = sys.argv[1:4]
expected = json.load(open(expected_path))
con = duckdb.connect()
con.execute("set TimeZone = 'UTC'")
figures = {}
# Athena's partition projection reads dt in 2020-01-01..NOW: every partition must lie there.
import datetime
today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")

def fail(msg):
    print(f"lake check failed: {msg}", file=sys.stderr)
    sys.exit(1)

for table, ids in expected.items():
    glob = f"{lake}/{table}/**/*.parquet"
    rows = con.execute(
        f"select event_id, dt, hour from read_parquet('{glob}', hive_partitioning = true, union_by_name = true)"
    ).fetchall()
    got = sorted(r[0] for r in rows)
    if len(got) != len(set(got)):
        fail(f"{table}: an event_id appears twice")
    if got != sorted(ids):
        fail(f"{table}: {len(got)} rows, expected {len(ids)}; missing {sorted(set(ids) - set(got))[:5]}, extra {sorted(set(got) - set(ids))[:5]}")
    # dt and hour come from the path (UTC): the event's own time when it lies within the 7
    # days before the stream received it (not after), else the time received; the
    # quarantine is partitioned by the time received.
    at = "received_at" if table == "quarantine" else (
        """(case when "time" <= received_at and "time" >= received_at - interval 7 day
                 then "time" else received_at end)""")
    outside = con.execute(
        f"""select count(*) from read_parquet('{glob}', hive_partitioning = true, union_by_name = true)
            where cast(dt as varchar) < '2020-01-01' or cast(dt as varchar) > '{today}'"""
    ).fetchone()[0]
    if outside:
        fail(f"{table}: {outside} rows in partitions outside 2020-01-01..{today}")
    bad = con.execute(
        f"""select count(*) from read_parquet('{glob}', hive_partitioning = true, union_by_name = true)
            where strftime({at}, '%Y-%m-%d') <> cast(dt as varchar)
               or hour({at}) <> cast(hour as integer)"""
    ).fetchone()[0]
    if table == "quarantine":
        empty = con.execute(
            f"""select count(*) from read_parquet('{glob}', hive_partitioning = true)
                where len(reasons) = 0 or raw = '' or reasons[1].pointer is null"""
        ).fetchone()[0]
        if empty:
            fail(f"quarantine: {empty} rows without their reasons or raw bytes")
    if bad:
        fail(f"{table}: {bad} rows in the wrong dt/hour partition")
    figures[table] = len(got)

# Column types as mapped, read by pyarrow.
schema = ds.dataset(f"{lake}/booking_requested", format="parquet", partitioning="hive").schema
types = {f.name: str(f.type) for f in schema}
for column, want in [("seats", "int8"), ("requested_at", "timestamp[us, tz=UTC]"),
                     ("booking_id", "string"), ("received_at", "timestamp[us, tz=UTC]")]:
    if types.get(column) != want:
        fail(f"booking_requested.{column} is {types.get(column)}, expected {want}")
duck_types = dict(con.execute(
    f"select column_name, column_type from (describe select * from read_parquet('{lake}/booking_requested/**/*.parquet', hive_partitioning = true))"
).fetchall())
if duck_types.get("seats") not in ("TINYINT",) or not duck_types.get("requested_at", "").startswith("TIMESTAMP"):
    fail(f"duckdb sees {duck_types}")

SCALARS = {"string": "VARCHAR", "tinyint": "TINYINT", "smallint": "SMALLINT", "int": "INTEGER",
           "bigint": "BIGINT", "double": "DOUBLE", "float": "FLOAT", "boolean": "BOOLEAN",
           "timestamp": "TIMESTAMPTZ", "date": "DATE"}

def duck_type(t):
    """An Athena (Hive) column type as DuckDB writes it."""
    t = t.strip()
    if t.startswith("array<") and t.endswith(">"):
        return duck_type(t[6:-1]) + "[]"
    if t.startswith("struct<") and t.endswith(">"):
        fields, depth, cur = [], 0, ""
        for ch in t[7:-1]:
            if ch == "," and depth == 0:
                fields.append(cur); cur = ""; continue
            depth += ch == "<"
            depth -= ch == ">"
            cur += ch
        fields.append(cur)
        return "STRUCT(" + ", ".join(f'"{f.split(":", 1)[0]}" {duck_type(f.split(":", 1)[1])}' for f in fields) + ")"
    return SCALARS[t]

# The DDL parses as Athena SQL, and DuckDB can create the same tables from its columns
# and read the files into them.
text = open(ddl_path).read()
statements = [s for s in sqlglot.parse(text, read="athena") if s is not None]
creates = [s for s in statements if s.key == "create"]
if len(creates) < len(expected):
    fail(f"{len(creates)} CREATE statements for {len(expected)} tables")
for block in re.findall(r"CREATE EXTERNAL TABLE IF NOT EXISTS `(\w+)` \((.*?)\n\)\nPARTITIONED", text, re.S):
    name, cols = block
    if name not in expected:
        continue
    columns = []
    for line in cols.strip().splitlines():
        m = re.match(r"\s*`(\w+)` (.+?),?$", line)
        col, typ = m.group(1), duck_type(m.group(2))
        columns.append(f'"{col}" {typ}')
    con.execute(f'create table "{name}" ({", ".join(columns)}, dt VARCHAR, hour INTEGER)')
    con.execute(
        f"""insert into "{name}" by name select * from read_parquet('{lake}/{name}/**/*.parquet', hive_partitioning = true, union_by_name = true)"""
    )
    n = con.execute(f'select count(*) from "{name}"').fetchone()[0]
    if n != figures[name]:
        fail(f"DDL table {name} holds {n} rows, expected {figures[name]}")

files = con.execute(f"select count(*), sum(size) from (select file, 0 as size from glob('{lake}/**/*.parquet'))").fetchone()
print(json.dumps({"rows": figures, "files": files[0], "ddl_statements": len(creates)}))
