"""ImageFS: a lazy, content-addressed, tiered read-only image filesystem (pyfuse3 + trio)."""
