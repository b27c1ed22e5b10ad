"""What an AWS error says, read without importing botocore.

One helper for the S3 store (store/s3.py, store/transfer.py) and the EC2
provider (providers/aws/): a botocore ``ClientError`` carries the service's
answer as ``response``, ``{"Error": {"Code": ..., "Message": ...}, ...}``.
"""

from __future__ import annotations


def error_code(err: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def error_message(err: BaseException) -> str:
    """The AWS error message of a botocore ClientError ('' for anything else)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message", ""))
    return ""


__all__ = ["error_code", "error_message"]
