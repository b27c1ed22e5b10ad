"""What every instance of a cluster shares, found or created once: the image,
the security group, the SSH key pair and the configured subnets.

Each is looked up on first use and kept for the life of the provider;
creation is safe against another control plane creating the same thing
at the same time (a "Duplicate" answer means it exists now).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from gpuscout.config import AwsSettings, default_home
from gpuscout.providers.aws.ec2 import Ec2, Ec2Error
from gpuscout.providers.base import LaunchError

log = logging.getLogger("gpuscout.providers.aws")

TAG_CLUSTER = "gpuscout:cluster"


def newest_image(images: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The image with the latest CreationDate (ISO 8601 strings sort as dates)."""
    ranked = sorted(images, key=lambda i: (i.get("CreationDate") or "", i.get("ImageId", "")))
    return ranked[-1] if ranked else None


def cluster_tags(config: AwsSettings, resource_type: str) -> list[dict[str, Any]]:
    """TagSpecifications that mark a created resource as the cluster's."""
    return [{"ResourceType": resource_type,
             "Tags": [{"Key": TAG_CLUSTER, "Value": config.cluster}]}]


class SharedResources:
    """The cluster's image, security group, key pair and subnets. Thread-safe."""

    def __init__(self, ec2: Ec2, config: AwsSettings) -> None:
        self.ec2 = ec2
        self.config = config
        self._lock = threading.RLock()
        self._ami: str | None = config.ami_id
        self._group_id: str | None = None
        self._key_ready = False
        self._subnet_by_zone: dict[str, str] | None = None

    def image_id(self) -> str:
        """``ami_id``, else the newest image named like ``ami_name_pattern``."""
        with self._lock:
            if self._ami:
                return self._ami
            config = self.config
            filters = [{"Name": "name", "Values": [config.ami_name_pattern]},
                       {"Name": "state", "Values": ["available"]}]
            image = newest_image(self.ec2.pages("describe_images", "Images",
                                                Owners=list(config.ami_owners), Filters=filters))
            if image is None:
                raise LaunchError(
                    f"no AMI named like {config.ami_name_pattern!r} owned by "
                    f"{', '.join(config.ami_owners)} in {config.region}; "
                    "set GPUSCOUT_AWS_AMI_ID")
            self._ami = str(image["ImageId"])
            log.info("using AMI %s (%s)", self._ami, image.get("Name"))
            return self._ami

    def subnets(self) -> dict[str, str]:
        """The configured subnets by zone."""
        with self._lock:
            if self._subnet_by_zone is None:
                found = self.ec2.call("describe_subnets", SubnetIds=list(self.config.subnet_ids))
                self._subnet_by_zone = {s["AvailabilityZone"]: s["SubnetId"]
                                        for s in found["Subnets"]}
            return self._subnet_by_zone

    def security_group_id(self) -> str:
        """The cluster's security group: found by name, else created with
        one ingress rule, the agent's port. Safe against a concurrent create."""
        with self._lock:
            if self._group_id:
                return self._group_id
            name, vpc = self._group_name(), self._vpc_id()
            filters = [{"Name": "group-name", "Values": [name]}]
            if vpc:
                filters.append({"Name": "vpc-id", "Values": [vpc]})
            groups = self.ec2.call("describe_security_groups", Filters=filters)["SecurityGroups"]
            if groups:
                self._group_id = str(groups[0]["GroupId"])
                return self._group_id
            params: dict[str, Any] = {
                "GroupName": name, "Description": "GPU Scout agents",
                "TagSpecifications": cluster_tags(self.config, "security-group"),
            }
            if vpc:
                params["VpcId"] = vpc
            try:
                group_id = str(self.ec2.call("create_security_group", **params)["GroupId"])
            except Ec2Error as err:
                if err.code != "InvalidGroup.Duplicate":
                    raise LaunchError(f"cannot create security group {name}: {err}") from err
                groups = self.ec2.call("describe_security_groups", Filters=filters)
                self._group_id = str(groups["SecurityGroups"][0]["GroupId"])
                return self._group_id
            port = self.config.agent_port
            rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
            if self.config.ingress_cidr:
                rule["IpRanges"] = [{"CidrIp": self.config.ingress_cidr,
                                     "Description": "GPU Scout control plane"}]
            else:
                rule["UserIdGroupPairs"] = [{"GroupId": group_id}]
            try:
                self.ec2.call("authorize_security_group_ingress", GroupId=group_id,
                              IpPermissions=[rule])
            except Ec2Error as err:
                if err.code != "InvalidPermission.Duplicate":
                    raise LaunchError(f"cannot open port {port} in {name}: {err}") from err
            self._group_id = group_id
            return group_id

    def ensure_key_pair(self) -> None:
        """Reuse the named key pair, or create it and save its private key
        (0600) under ``key_dir``: AWS shows a private key only once."""
        with self._lock:
            name = self.config.key_name
            if self._key_ready or not name:
                return
            try:
                self.ec2.call("describe_key_pairs", KeyNames=[name])
            except Ec2Error as err:
                if err.code != "InvalidKeyPair.NotFound":
                    raise LaunchError(f"cannot look up key pair {name}: {err}") from err
                try:
                    created = self.ec2.call("create_key_pair", KeyName=name,
                                            TagSpecifications=cluster_tags(self.config,
                                                                           "key-pair"))
                except Ec2Error as dup:
                    if dup.code != "InvalidKeyPair.Duplicate":
                        raise LaunchError(f"cannot create key pair {name}: {dup}") from dup
                else:
                    self._save_key(name, str(created["KeyMaterial"]))
            self._key_ready = True

    def _save_key(self, name: str, material: str) -> None:
        folder = self.config.key_dir or default_home() / "aws"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(material)
        log.info("created key pair %s; private key saved to %s", name, path)

    def _group_name(self) -> str:
        return self.config.security_group or f"gpuscout-{self.config.cluster}"

    def _vpc_id(self) -> str | None:
        if not self.config.subnet_ids:
            return None
        subnets = self.ec2.call("describe_subnets", SubnetIds=[self.config.subnet_ids[0]])
        return str(subnets["Subnets"][0]["VpcId"])


__all__ = ["TAG_CLUSTER", "SharedResources", "cluster_tags", "newest_image"]
