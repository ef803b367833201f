"""Compute logs in S3 for the production profile, configured from the settings.

dagster_aws's S3ComputeLogManager takes its bucket and prefix from the instance's YAML,
where `{env: VAR}` makes every variable mandatory, and its credentials silently from
boto3's default chain. This one reads OSA_COMPUTE_LOG_BUCKET (required),
OSA_COMPUTE_LOG_PREFIX (default "compute-logs"), OSA_S3_ENDPOINT_URL, and the credentials
OSA_COMPUTE_LOG_ACCESS_KEY_ID / OSA_COMPUTE_LOG_SECRET_ACCESS_KEY when set (else boto3's
chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, an instance role), through the
settings model, so a wrong or missing one is one line naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import boto3
from dagster import Field, IntSource
from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

from osa_dagster.defs.dagster_private import ConfigurableClassData
from osa_dagster.defs.instance_storage import HelpersSpareCtrlC
from osa_dagster.settings import Settings, SettingsError


class S3ComputeLogs(HelpersSpareCtrlC, S3ComputeLogManager):
    """S3ComputeLogManager configured from the settings (see the module doc), whose helper
    processes spare a Ctrl-C (HelpersSpareCtrlC)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, **config: Any) -> None:
        settings = Settings.from_env()
        if not settings.compute_log_bucket:
            raise SettingsError("OSA_COMPUTE_LOG_BUCKET is not set: the bucket of the compute logs")
        super().__init__(
            bucket=settings.compute_log_bucket,
            prefix=settings.compute_log_prefix,
            endpoint_url=settings.s3_endpoint_url,
            inst_data=inst_data,
            **config,
        )
        key, secret = settings.compute_log_access_key_id, settings.compute_log_secret_access_key
        if bool(key) != bool(secret):
            raise SettingsError(
                "OSA_COMPUTE_LOG_ACCESS_KEY_ID and OSA_COMPUTE_LOG_SECRET_ACCESS_KEY go together"
            )
        if key:
            # The parent made its client from boto3's default session; the named credentials
            # replace it with one of their own, for the same endpoint.
            session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret)
            self._s3_session = session.client("s3", endpoint_url=settings.s3_endpoint_url)

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {"upload_interval": Field(IntSource, is_required=False)}

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        return cls(inst_data=inst_data, **config_value)
