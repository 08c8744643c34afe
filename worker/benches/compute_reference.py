#!/usr/bin/env python3
"""Reference engines for `cargo bench --bench compute`: runs the sample SQL over
the bench's CSV with DataFusion-python and DuckDB, timed from the registered
file, and prints one JSON line per engine:
{"engine", "median_s", "merchants", "gmv", "orders"}.

Usage: compute_reference.py CSV SQL RUNS THREADS

The packages live in a venv under ~/.cache/ballast/venv (or $BALLAST_VENV),
created and filled on first use; the script re-runs itself there.
"""

import json
import os
import statistics
import subprocess
import sys
import time

VENV = os.path.expanduser(os.environ.get("BALLAST_VENV", "~/.cache/ballast/venv"))
PACKAGES = ["datafusion==55.0.0", "duckdb==2.0.0"]


def ensure_venv():
    python = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    probe = subprocess.run([python, "-c", "import datafusion, duckdb"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], check=True,
                       stdout=sys.stderr)
    os.execv(python, [python, *sys.argv])


def statements(sql_text):
    """The SQL's statements: `--` comments dropped, split on `;` (the sample
    SQL has no `;` inside strings)."""
    lines = [line.split("--", 1)[0] for line in sql_text.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def summary(rows):
    """(merchants, total gmv, total orders) from rows of dicts."""
    return len(rows), sum(r["gmv"] for r in rows), sum(r["orders"] for r in rows)


def run_datafusion(csv, stmts, threads):
    import datafusion

    config = datafusion.SessionConfig().with_target_partitions(threads)
    ctx = datafusion.SessionContext(config)
    ctx.register_csv("orders", csv, has_header=True)
    start = time.perf_counter()
    for stmt in stmts[:-1]:
        ctx.sql(stmt).collect()
    table = ctx.sql(stmts[-1]).to_arrow_table()
    elapsed = time.perf_counter() - start
    return elapsed, summary(table.to_pylist())


def run_duckdb(csv, stmts, threads):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute(f"CREATE VIEW orders AS SELECT * FROM read_csv('{csv}', header = true)")
    start = time.perf_counter()
    for stmt in stmts[:-1]:
        con.execute(stmt)
    cursor = con.execute(stmts[-1])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, r)) for r in cursor.fetchall()]
    elapsed = time.perf_counter() - start
    con.close()
    return elapsed, summary(rows)


def main():
    ensure_venv()
    csv, sql_path, runs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(sql_path) as f:
        stmts = statements(f.read())
    import datafusion
    import duckdb

    engines = [
        (f"DataFusion-python {datafusion.__version__}", run_datafusion),
        (f"DuckDB {duckdb.__version__}", run_duckdb),
    ]
    for name, run in engines:
        times, result = [], None
        for _ in range(runs):
            elapsed, result = run(csv, stmts, threads)
            times.append(elapsed)
        merchants, gmv, orders = result
        print(json.dumps({"engine": name, "median_s": statistics.median(times),
                          "merchants": merchants, "gmv": gmv, "orders": orders}), flush=True)


if __name__ == "__main__":
    main()
