"""boto3 is the aws extra's: a training script does not load it.

What a user relies on: ``import gpuscout.workload`` (and its torch helpers)
in a training script costs no boto3 import (about 0.2 s, and none at all
where the aws extra is not installed); the AWS provider's package imports
without it too, loading boto3 only when it makes a client. Each check runs
in a fresh interpreter, since this process has loaded boto3 long ago.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def imports_without_boto3(statement: str) -> subprocess.CompletedProcess[str]:
    check = ("import sys; loaded = sorted({'boto3', 'botocore'} & set(sys.modules)); "
             "assert not loaded, loaded")
    return subprocess.run([sys.executable, "-c", f"{statement}; {check}"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("statement", [
    "import gpuscout.workload, gpuscout.workload.torch",
    "from gpuscout.store import open_store; open_store('file://{tmp}/store')",
    "from gpuscout.providers.aws import AwsConfig, AwsProvider; AwsConfig()",
])
def test_importing_does_not_load_boto3(statement: str, tmp_path: Path) -> None:
    done = imports_without_boto3(statement.format(tmp=tmp_path))
    assert done.returncode == 0, done.stderr


def test_an_s3_store_still_loads_it() -> None:
    done = imports_without_boto3("from gpuscout.store import S3Store")
    assert done.returncode != 0 and "boto3" in done.stderr
