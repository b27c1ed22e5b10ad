"""One settings object, read from GPUSCOUT_* environment variables.

CLI flags of ``gpuscout up`` override the environment. Validators fail fast
with a message that names the variable.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpuscout.policy import ZONE_BACKOFF_S
from gpuscout.providers.code_bundle import DEFAULT_URL_TTL_S


def default_home() -> Path:
    return Path.home() / ".gpuscout"


class AwsSettings(BaseModel):
    """The AWS provider's settings (``Settings.aws``, GPUSCOUT_AWS_*), which
    are also its config (``gpuscout.providers.aws.AwsConfig``): each default
    is written here once."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    region: str = "us-east-1"
    cluster: str = "default"  # the gpuscout:cluster tag of every resource
    ami_id: str | None = None  # default: the newest image named like the pattern
    # AWS Deep Learning AMIs (GPU drivers, CUDA, Python) published by Amazon.
    ami_name_pattern: str = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"
    ami_owners: Annotated[tuple[str, ...], NoDecode] = ("amazon",)
    # Comma-separated in the environment; empty: the default VPC, else offers
    # only in these subnets' zones.
    subnet_ids: Annotated[tuple[str, ...], NoDecode] = ()
    key_name: str | None = None  # SSH key pair, created if missing, the private key saved
    key_dir: Path | None = None  # ...here (default: HOME/aws)
    instance_profile: str | None = None  # gives the instances the store
    security_group: str | None = None  # default: gpuscout-<cluster>, created if missing
    ingress_cidr: str | None = None  # who reaches the agent port; default: the group itself
    agent_port: int = Field(default=8700, ge=1, le=65535)
    public_ip: bool = False  # reach instances by public IP (control plane outside the VPC)
    # What bootstrap.sh pip-installs where the AMI lacks gpuscout (a wheel
    # URL, a pinned name on your index: name the aws extra, gpuscout[aws],
    # for the agent's S3 store). None: with ship_code and an s3:// store,
    # this gpuscout as a wheel in the store, named in the user-data by a
    # presigned URL valid code_url_ttl_s (SigV4: at most 7 days); else the
    # AMI must have gpuscout.
    package_spec: str | None = None
    ship_code: bool = True
    code_url_ttl_s: float = Field(default=DEFAULT_URL_TTL_S, gt=0, le=7 * 24 * 3600)
    # How long offers are cached (GPUSCOUT_AWS_OFFERS_REFRESH_S).
    offers_ttl_s: float = Field(default=300.0, gt=0, validation_alias=AliasChoices(
        "offers_ttl_s", "offers_refresh_s"))
    # An Elastic IP (allocation id) moved to each job's current instance;
    # None: only the proxy follows the job.
    elastic_ip: str | None = Field(default=None, pattern=r"^eipalloc-[0-9a-f]+$")
    max_attempts: int = Field(default=6, ge=1)  # per EC2 call, botocore's retries included
    public_ip_wait_s: float = Field(default=60.0, ge=0)

    @field_validator("subnet_ids", "ami_owners", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @classmethod
    def from_settings(cls, settings: Settings) -> AwsSettings:
        """``settings.aws``, its key folder under ``settings.home`` by default."""
        aws = settings.aws
        return aws if aws.key_dir else aws.model_copy(update={"key_dir": settings.home / "aws"})


class Settings(BaseSettings):
    # GPUSCOUT_AWS_REGION -> aws.region: one split after the nested model's
    # name, so that field names keep their underscores.
    model_config = SettingsConfigDict(env_prefix="GPUSCOUT_", extra="ignore",
                                      env_nested_delimiter="_", env_nested_max_split=1)

    home: Path = Field(default_factory=default_home)
    database_url: str | None = None  # default: sqlite file under home
    store_url: str | None = None  # default: file store under home
    api_token: str | None = None  # default: generated into home on first `up`
    # Seals job secrets at rest (a Fernet key); default: generated into home.
    secrets_key: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    scout_interval_s: float = Field(default=120.0, gt=0)
    savings_threshold: float = Field(default=0.20, ge=0, lt=1)
    provider: Literal["local", "aws"] = "local"
    market: str = "manual"  # manual | trace:PATH[@SPEED] | aws
    boot_delay_s: float = Field(default=5.0, ge=0)  # local provider only
    reconcile_interval_s: float = Field(default=0.5, gt=0)
    reaper_interval_s: float = Field(default=30.0, gt=0)
    health_timeout_s: float = Field(default=120.0, gt=0)
    checkpoint_timeout_s: float = Field(default=120.0, gt=0)
    # The scout's policy (gpuscout.policy.migration explains each).
    min_dwell_s: float = Field(default=600.0, ge=0)
    max_moves_per_job: int | None = Field(default=10, ge=0)
    deadline_margin_s: float = Field(default=60.0, ge=0)
    zone_backoff_s: float = Field(default=ZONE_BACKOFF_S, ge=0)  # spot in a zone after a preemption
    # What a move costs, until past moves measure it. Default by provider:
    # local boot_delay_s + 2 s, 2 s, 2 s; aws 180 s, 30 s, 60 s.
    move_boot_s: float | None = Field(default=None, ge=0)
    move_checkpoint_s: float | None = Field(default=None, ge=0)
    move_restore_s: float | None = Field(default=None, ge=0)
    egress_usd_per_gb: float = Field(default=0.02, ge=0)  # between regions
    # AWS provider (GPUSCOUT_PROVIDER=aws): GPUSCOUT_AWS_<FIELD>, e.g.
    # GPUSCOUT_AWS_REGION; credentials come from boto3's own chain
    # (environment, ~/.aws, instance profile), never from here.
    aws: AwsSettings = Field(default_factory=AwsSettings)

    @field_validator("market")
    @classmethod
    def _market_kind(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("manual", "trace", "aws"):
            raise ValueError("GPUSCOUT_MARKET must be manual, trace:PATH[@SPEED] or aws")
        if kind == "trace" and not value.partition(":")[2]:
            raise ValueError("GPUSCOUT_MARKET=trace needs a path: trace:PATH[@SPEED]")
        return value

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'gpuscout.db'}"

    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{self.home / 'store'}"

    def ensure_token(self) -> str:
        """The API token: from the environment, else read or made in home."""
        if self.api_token:
            return self.api_token
        path = self.home / "api_token"
        if path.exists():
            token = path.read_text().strip()
        else:
            self.home.mkdir(parents=True, exist_ok=True)
            token = secrets.token_urlsafe(24)
            path.write_text(token + "\n")
            path.chmod(0o600)
        self.api_token = token
        return token
