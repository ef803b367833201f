"""Conventions: an upstream database's ingester, hooks and record schema, and the batch steps."""
