"""Process snapshots: CRIU checkpoint/restore of engine process trees."""
