"""Bulk ingestion of public scientific databases into the OSA archive."""
