"""Load generator and failure injection for tokenledger.

`python -m bench` (make bench) measures latency and throughput of the real
service, started as a subprocess on a throwaway PostgreSQL; `python -m
bench.chaos` (make chaos) runs load while the service's database
connections are killed, then checks that every effect was counted exactly
once. bench/harness.py holds the shared machinery.
"""
