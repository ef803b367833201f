"""The Dagster layer: partitions, assets, jobs, sensors, resources; thin over the layers below."""
