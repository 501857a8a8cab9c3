"""The meter simulator (demo, tests, benchmarks); not part of the daemon."""
