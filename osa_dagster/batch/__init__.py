"""The steps one batch goes through, without an orchestrator.

plan -> fetch -> hooks (each hook) -> publish (records, then features) -> audit.
The Dagster assets call these one to one; a notebook, a deposition service or a benchmark
can too. Each step reads what the previous one left in the artifact store, so any step can
be re-run alone for one partition.
"""


class BatchInputError(ValueError):
    """Input of a batch that cannot be used; the message names the batch and the place."""
