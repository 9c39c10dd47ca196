"""Load generator and failure injection for tokenledger.

`python -m bench` (make bench) measures latency and throughput of the real
service, started as a subprocess on a throwaway PostgreSQL; `python -m
bench.chaos` (make chaos) runs load while the service's database
connections are killed, then checks that every effect was counted exactly
once.

The shared machinery: bench/postgres.py and bench/process.py (PostgreSQL and
the service as processes), bench/api.py (set-up over HTTP), bench/driver.py
(workers and their options), bench/stats.py and bench/probes.py (what a
scenario saw), bench/report.py (results and tables); bench/harness.py runs
the benchmark, one module per scenario in bench/scenarios/.
"""

from pathlib import Path

# The checkout: the service runs from here, results are written below it.
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
