"""The `stableprefix` command: argument parsing, `run` (mitmproxy supervised), `report`, `demo`."""
