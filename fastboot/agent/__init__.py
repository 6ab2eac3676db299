"""The per-host node agent: restores replicas of snapshots in their own namespaces."""
