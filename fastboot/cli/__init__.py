"""The `fastboot` command line: a thin layer over fastboot's programmatic API."""
