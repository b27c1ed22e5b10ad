"""Render the boot script an instance runs: bootstrap.sh plus its environment.

The rendered text is what the local provider runs with bash and what the AWS
provider passes as EC2 user-data, so it must stay under EC2's 16 KB user-data
limit and carry nothing but what the caller put in the request (the agent
token included: it is the instance's own secret, not the control plane's).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from importlib import resources

from gpuscout.agent import protocol
from gpuscout.providers.base import LaunchRequest

# EC2 refuses user-data larger than 16 KB (before base64 encoding).
MAX_USER_DATA_BYTES = 16 * 1024

# What a provider may add to a job's boot script beyond the job's own values:
# on AWS, the presigned URL of the gpuscout wheel (about 1.5 KB with a
# session token) and the instance metadata endpoint. A job is refused at
# submit when its command, setup and envs leave less than this free.
PROVIDER_RESERVE_BYTES = 3 * 1024

ENV_MARKER = "# @GPUSCOUT_ENV@"

# Read by bootstrap.sh only; the agent does not need them.
ENV_PYTHON = "GPUSCOUT_PYTHON"
ENV_PACKAGE_SPEC = "GPUSCOUT_PACKAGE_SPEC"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def bootstrap_template() -> str:
    """The unrendered bootstrap.sh shipped in the package."""
    return resources.files("gpuscout.providers").joinpath("bootstrap.sh").read_text()


def bootstrap_env(
    request: LaunchRequest,
    *,
    agent_host: str,
    agent_port: int,
    python: str | None = None,
    package_spec: str | None = None,
    instance_dir: str | None = None,
) -> dict[str, str | None]:
    """The variables the rendered script sets, in order; None means unset.

    ``request.env`` comes first and may not redefine a variable GPU Scout sets
    (ValueError), so a job cannot spoof its identity or its agent's port.
    Optional values that are not given are *unset* rather than exported
    empty, so nothing inherited from the machine's environment stands in
    for them.
    """
    ours: dict[str, str | None] = {
        protocol.ENV_INSTANCE_ID: request.instance_id,
        protocol.ENV_JOB_ID: request.job_id,
        protocol.ENV_AGENT_HOST: agent_host,
        protocol.ENV_AGENT_PORT: str(agent_port),
        protocol.ENV_AGENT_TOKEN: request.agent_token,
        protocol.ENV_STORE_URL: request.store_url,
        protocol.ENV_COMMAND: request.command,
        protocol.ENV_STANDBY: "1" if request.standby else "0",
        protocol.ENV_WORKDIR: request.workdir or None,
        protocol.ENV_CONTROL_URL: request.control_url or None,
        protocol.ENV_OFFER_ID: request.offer.id,
        protocol.ENV_WORKDIR_REF: request.workdir_ref or None,
        protocol.ENV_SETUP: request.setup or None,
        protocol.ENV_SECRET_NAMES: ",".join(request.secret_names) or None,
        ENV_PYTHON: python or None,
        ENV_PACKAGE_SPEC: package_spec or None,
        protocol.ENV_INSTANCE_DIR: instance_dir or None,
    }
    clash = sorted(set(request.env) & set(ours))
    if clash:
        raise ValueError(f"LaunchRequest.env may not set {', '.join(clash)}")
    env: dict[str, str | None] = {**request.env, **ours}
    for name, value in env.items():
        if not _NAME.match(name):
            raise ValueError(f"LaunchRequest.env: {name!r} is not a shell variable name")
        if value is not None and "\0" in value:
            raise ValueError(f"environment variable {name} contains a NUL byte")
    return env


def render_bootstrap(
    request: LaunchRequest,
    *,
    agent_host: str,
    agent_port: int,
    python: str | None = None,
    package_spec: str | None = None,
    instance_dir: str | None = None,
) -> str:
    """bootstrap.sh with the agent's environment set at its top.

    ``python``: an interpreter that already has gpuscout (the local provider
    passes its own); ``package_spec``: what to ``pip install`` when no Python
    on the machine has gpuscout; ``instance_dir``: the folder for the agent's
    log (and a venv); by default /var/lib/gpuscout as root, else under HOME.
    Values are quoted with shlex.quote, so quotes, ``$``, backticks and
    newlines in the command reach the agent byte for byte.
    Raises ValueError for bad variable names and for a script over 16 KB.
    """
    env = bootstrap_env(
        request,
        agent_host=agent_host,
        agent_port=agent_port,
        python=python,
        package_spec=package_spec,
        instance_dir=instance_dir,
    )
    block = "\n".join(
        f"unset {name}" if value is None else f"export {name}={shlex.quote(value)}"
        for name, value in env.items()
    )
    template = bootstrap_template()
    if template.count(ENV_MARKER) != 1:
        raise RuntimeError(f"bootstrap.sh must contain the line {ENV_MARKER!r} exactly once")
    script = template.replace(ENV_MARKER, block)
    size = len(script.encode())
    if size > MAX_USER_DATA_BYTES:
        raise ValueError(
            f"rendered bootstrap is {size} bytes, over the {MAX_USER_DATA_BYTES}-byte "
            "EC2 user-data limit (is the command or env very long?)"
        )
    return script


def job_size_problem(command: str, setup: str | None, envs: dict[str, str],
                     secret_names: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """Why a job's values cannot fit in its instances' boot script, as
    ``(field, message)``, or None when they fit with room for the provider's
    own values (``PROVIDER_RESERVE_BYTES``).

    The script is what EC2 takes as user-data (16 KB at most), so this is
    checked at submit, before anything is launched. The field named is the
    largest of command, setup and envs.
    """
    from gpuscout.domain import Capacity, Offer

    offer = Offer(id="x" * 64, provider="aws", region="r", zone="z", instance_type="t",
                  capacity=Capacity.SPOT, gpus=0, gpu_type=None, vcpus=1, memory_gb=1,
                  price_per_hour=1.0)
    request = LaunchRequest(
        instance_id="i-" + "0" * 38, job_id="job-" + "0" * 36, offer=offer, command=command,
        store_url="s3://" + "b" * 63 + "/" + "p" * 64, control_url="http://" + "h" * 64,
        agent_token="t" * 32, standby=True, workdir_ref="sha256:" + "0" * 64, setup=setup,
        secret_names=secret_names, env=dict(envs))
    try:
        script = render_bootstrap(request, agent_host="0.0.0.0", agent_port=65535,  # noqa: S104
                                  instance_dir="/var/lib/gpuscout")
    except ValueError as err:
        if "variable" in str(err) or "may not set" in str(err):
            return "envs", str(err)
        script = None
    size = len(script.encode()) if script is not None else MAX_USER_DATA_BYTES + 1
    room = MAX_USER_DATA_BYTES - PROVIDER_RESERVE_BYTES
    if size <= room:
        return None
    sizes = {"command": len(command.encode()), "setup": len((setup or "").encode()),
             "envs": sum(len(k) + len(v.encode()) + 2 for k, v in envs.items())}
    field = max(sizes, key=lambda k: sizes[k])
    own = len(render_bootstrap(replace(request, command="x", setup=None, env={}),
                               agent_host="0.0.0.0", agent_port=65535,  # noqa: S104
                               instance_dir="/var/lib/gpuscout").encode())
    return field, (
        f"{sizes[field]} bytes, of {sum(sizes.values())} for command, setup and envs together; "
        f"with the boot script ({own} bytes) they must fit in {room} bytes (EC2's "
        f"{MAX_USER_DATA_BYTES}-byte user-data less {PROVIDER_RESERVE_BYTES} for the provider); "
        "put long commands in a script in the job's workdir")
