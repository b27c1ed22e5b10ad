"""Providers: where instances come from (see base.py for the contract).

``local`` runs instances as process groups on this machine, ``fake`` keeps
them in memory for tests; the AWS provider is imported from its own module
so that boto3 is loaded only when it is used.
"""

from gpuscout.providers.base import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    Provider,
    ProviderError,
    ProviderInstance,
    ProviderState,
    is_not_found,
)
from gpuscout.providers.bootstrap import render_bootstrap
from gpuscout.providers.fake import FakeProvider
from gpuscout.providers.local import LocalProvider

__all__ = [
    "CapacityError", "FakeProvider", "InstanceNotFound", "LaunchError", "LaunchRequest",
    "LocalProvider", "Provider", "ProviderError", "ProviderInstance", "ProviderState",
    "is_not_found", "render_bootstrap",
]
