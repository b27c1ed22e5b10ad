"""The AWS provider, split by concern as SkyPilot's ``sky/provision/aws/``:

- ``ec2.py``: the EC2 client, botocore's standard retries and paginators,
  and the errors a caller branches on;
- ``offers.py``: offers and prices read from EC2;
- ``resources.py``: what a cluster's instances share (image, security
  group, key pair, subnets), found or created once;
- ``instances.py``: tags, states, spot notices and the user-data;
- ``provider.py``: ``AwsProvider``, the Provider protocol over them.

Its settings are ``Settings.aws`` (gpuscout/config.py), also named
``AwsConfig`` here. boto3 is imported only when a client is made: install
the ``aws`` extra (``pip install 'gpuscout[aws]'``) to use it.
"""

from gpuscout.config import AwsSettings as AwsConfig
from gpuscout.providers.aws.ec2 import ThrottledError, ec2_client, retry_config
from gpuscout.providers.aws.instances import check_user_data
from gpuscout.providers.aws.provider import AGENT_EXTRA, AwsProvider
from gpuscout.providers.aws.resources import newest_image

__all__ = [
    "AGENT_EXTRA", "AwsConfig", "AwsProvider", "ThrottledError", "check_user_data",
    "ec2_client", "newest_image", "retry_config",
]
