"""Reads a lake table that floodgate wrote to S3 (moto server), with readers that share
no code with it, and prints what they found as one JSON object.

    read_lake.py ENDPOINT BUCKET PREFIX TABLE

- pyarrow's S3 filesystem (the AWS C++ SDK, path-style, plain http) lists
  s3://BUCKET/PREFIXTABLE/ and reads it as a Hive-partitioned dataset: rows, event ids,
  partition columns;
- DuckDB reads s3://BUCKET/PREFIXTABLE/**/*.parquet itself, over S3 with its httpfs
  extension (path-style, plain http), with its own Parquet reader. DuckDB downloads httpfs
  from its own site, which our machines cannot reach; PyPI carries it for DuckDB 1.4.4
  only, so scripts/venv installs that DuckDB and its httpfs into .venv/duckdb-s3/, apart
  from the venv's own DuckDB, and this script uses them ("duckdb_over_s3": true). Without
  them, DuckDB reads the bytes pyarrow fetched ("duckdb_over_s3": false), and the tests
  that need DuckDB over S3 say so.
"""

import glob
import json
import os
import sys
import tempfile

# DuckDB with httpfs (see above), ahead of the venv's own.
DUCKDB_S3 = os.path.join(os.path.dirname(sys.executable), "..", "duckdb-s3")
HTTPFS = glob.glob(os.path.join(DUCKDB_S3, "duckdb_ext", "extensions", "*", "*", "httpfs.duckdb_extension"))
if HTTPFS:
    sys.path.insert(0, DUCKDB_S3)

import duckdb  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402


def main() -> None:
    endpoint, bucket, prefix, table = sys.argv[1:5]
    host = endpoint.removeprefix("http://")
    s3 = pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key="test",
        secret_key="test",
        region="us-east-1",
    )
    root = f"{bucket}/{prefix}{table}"
    infos = s3.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        # Nothing written: say so, for the test to report what it expected.
        json.dump({"files": [], "pyarrow_rows": 0, "pyarrow_event_ids": [], "duckdb_rows": 0,
                   "duckdb_event_ids": [], "pyarrow_raw": []}, sys.stdout)
        return
    dataset = ds.dataset(files, filesystem=s3, format="parquet", partitioning="hive", partition_base_dir=root)
    arrow = dataset.to_table()
    out = {
        "files": [f.removeprefix(root + "/") for f in files],
        "pyarrow_rows": arrow.num_rows,
        # Rows without an id (the quarantine's unreadable bodies) are counted, not listed.
        "pyarrow_event_ids": sorted(i for i in arrow.column("event_id").to_pylist() if i is not None),
        "pyarrow_partitions": sorted({f"dt={d}/hour={h:02d}" if isinstance(h, int) else f"dt={d}/hour={h}"
                                      for d, h in zip(arrow.column("dt").to_pylist(), arrow.column("hour").to_pylist())}),
    }

    con = duckdb.connect()
    try:
        con.sql(f"LOAD '{HTTPFS[0]}'" if HTTPFS else "LOAD httpfs")
        out["duckdb_over_s3"] = True
    except duckdb.Error:
        out["duckdb_over_s3"] = False
    out["duckdb_version"] = duckdb.__version__
    if out["duckdb_over_s3"]:
        con.sql(f"SET s3_endpoint='{host}'; SET s3_use_ssl=false; SET s3_url_style='path';"
                " SET s3_access_key_id='test'; SET s3_secret_access_key='test'; SET s3_region='us-east-1'")
        source = f"read_parquet('s3://{root}/**/*.parquet', hive_partitioning=true)"
        out["duckdb_rows"] = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
        ids = con.execute(
            f"SELECT event_id FROM {source} WHERE event_id IS NOT NULL ORDER BY event_id"
        ).fetchall()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                local = os.path.join(tmp, f.removeprefix(root + "/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with s3.open_input_stream(f) as src, open(local, "wb") as dst:
                    dst.write(src.read())
            source = f"read_parquet('{tmp}/**/*.parquet', hive_partitioning=true)"
            out["duckdb_rows"] = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
            ids = con.execute(
                f"SELECT event_id FROM {source} WHERE event_id IS NOT NULL ORDER BY event_id"
            ).fetchall()
    out["duckdb_event_ids"] = [r[0] for r in ids]
    if "raw" in arrow.column_names:
        out["pyarrow_raw"] = sorted(arrow.column("raw").to_pylist())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
