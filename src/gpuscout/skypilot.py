"""Reads a SkyPilot task file as a GPU Scout job.

A SkyPilot task file (format: https://docs.skypilot.co/en/latest/reference/yaml-spec.html)
describes one job much as a GPU Scout job file does: a command, a setup script, a
working folder, environment variables and the hardware to run on. ``from_skypilot``
maps the parsed YAML mapping to the body of ``POST /api/v1/jobs``; ``looks_like_skypilot``
tells the two kinds of file apart.

Every key of the task file is either mapped, accepted with a note (ignored, or read a
little differently than SkyPilot reads it; the notes say how), or refused with a
``TaskFileError`` that names the key: a key is never dropped silently. The module is
pure: no files, no network, no clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_NAME",
    "SPEC_URL",
    "SkyPilotMapping",
    "TaskFileError",
    "from_skypilot",
    "looks_like_skypilot",
]

SPEC_URL = "https://docs.skypilot.co/en/latest/reference/yaml-spec.html"
DEFAULT_NAME = "sky-task"


class TaskFileError(ValueError):
    """A SkyPilot task file GPU Scout cannot run as written.

    ``key`` is the dotted path of the key at fault (``"num_nodes"``,
    ``"resources.accelerators"``, ``"envs.HF_TOKEN"``); ``str(error)`` is one line,
    ``"<key>: <message>"``, e.g. ``"num_nodes: 4 nodes asked; GPU Scout runs
    single-node jobs (num_nodes: 1)"``.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.message))


@dataclass(frozen=True)
class SkyPilotMapping:
    """What ``from_skypilot`` made of a task file.

    ``body``: the GPU Scout job body, with only the keys the file gave (GPU Scout's
    defaults fill the rest)::

        {"name": str, "command": str, "setup": str, "workdir": str,
         "envs": {str: str}, "secrets": {str: str}, "max_restarts_on_errors": int,
         "resources": {"gpus": int, "gpu_type": str | [str, ...], "cpus": float,
                       "memory_gb": float, "capacity": "spot" | "on-demand",
                       "instance_type": str, "region": str, "zone": str}}

    ``notes``: one line per thing accepted but ignored or interpreted, for the user.
    """

    body: dict[str, Any]
    notes: tuple[str, ...] = ()


# --- telling the two kinds of file apart ----------------------------------------------

# Keys only a SkyPilot task file has (GPU Scout's job file shares name, workdir,
# setup, envs, secrets and resources).
_SKYPILOT_ONLY_TOP = frozenset({
    "run", "num_nodes", "file_mounts", "storage", "service", "pool", "config",
    "experimental", "event_callback", "volumes", "volume_mounts", "inputs", "outputs",
    "managed_secrets",
})
_SKYPILOT_ONLY_RESOURCES = frozenset({
    "accelerators", "use_spot", "infra", "cloud", "memory", "job_recovery",
    "spot_recovery", "disk_size", "disk_tier", "network_tier", "image_id", "ports",
    "labels", "any_of", "ordered", "accelerator_args", "autostop", "max_hourly_cost",
    "local_disk", "ephemeral_storage", "priority", "priority_class",
})


def looks_like_skypilot(data: dict[str, Any]) -> bool:
    """True when ``data`` (a parsed YAML mapping) is a SkyPilot task, not a GPU Scout job.

    A SkyPilot task runs ``run`` (https://docs.skypilot.co/en/latest/reference/yaml-spec.html);
    a GPU Scout job file runs ``command``. Without either, keys only SkyPilot has
    decide: ``num_nodes``, ``file_mounts``, ..., or ``resources.accelerators``,
    ``use_spot``, ``infra``, ``cloud``, ``memory`` (GPU Scout says ``memory_gb``), and
    ``resources.gpus`` given as a string, list or mapping (SkyPilot's alias of
    ``accelerators``; GPU Scout's ``gpus`` is a count).

    Raises ``TaskFileError`` (key ``"run"``) for a file with both ``run`` and ``command``.
    """
    if not isinstance(data, dict):
        return False
    if "run" in data and "command" in data:
        raise TaskFileError(
            "run", "both run (SkyPilot) and command (GPU Scout) given; "
            "a job file is one or the other")
    if "run" in data:
        return True
    if "command" in data:
        return False
    if any(key in _SKYPILOT_ONLY_TOP for key in data):
        return True
    resources = data.get("resources")
    if isinstance(resources, dict):
        if any(key in _SKYPILOT_ONLY_RESOURCES for key in resources):
            return True
        gpus = resources.get("gpus")
        if isinstance(gpus, str | list | dict):
            return True
    return False


# --- the mapping ------------------------------------------------------------------------

# Top-level keys SkyPilot knows that GPU Scout cannot honour, with the reason.
_TOP_REFUSED = {
    "file_mounts": "GPU Scout uploads only workdir; fetch other data in setup "
                   "(e.g. aws s3 cp) or put it under workdir",
    "storage": "storage mounts are not supported; fetch the data in setup instead",
    "service": "SkyServe services are not supported; GPU Scout runs batch jobs",
    "pool": "SkyPilot worker pools are not supported; GPU Scout runs one job per instance",
    "config": "per-task SkyPilot config overrides have no GPU Scout equivalent",
    "experimental": "SkyPilot experimental options have no GPU Scout equivalent",
    "event_callback": "event callbacks are not supported; GPU Scout reports job events "
                      "through its API and dashboard",
    "volumes": "volumes are not supported; GPU Scout checkpoints to its own store",
    "volume_mounts": "volumes are not supported; GPU Scout checkpoints to its own store",
    "inputs": "SkyPilot's experimental inputs/outputs sizes are not supported",
    "outputs": "SkyPilot's experimental inputs/outputs sizes are not supported",
    "managed_secrets": "SkyPilot-managed secrets are not available; give the values "
                       "under secrets",
}
_TOP_MAPPED = ("name", "run", "setup", "workdir", "envs", "secrets", "num_nodes",
               "resources")

# resources keys SkyPilot knows that GPU Scout cannot honour, with the reason.
_RESOURCES_REFUSED = {
    "ports": "GPU Scout opens no inbound ports on job instances",
    "image_id": "GPU Scout boots its own image; install what the job needs in setup",
    "accelerator_args": "TPU settings; GPU Scout runs on AWS GPU instances",
    "network_tier": "GPU Scout has no network tiers (it runs single-node jobs)",
    "max_hourly_cost": "GPU Scout caps a job's total spend with budget_usd, "
                       "not an hourly price",
    "local_disk": "GPU Scout does not pick instances by local disk",
    "priority": "GPU Scout has no job priorities",
    "priority_class": "GPU Scout has no job priorities",
    "volumes": "volumes are not supported; GPU Scout checkpoints to its own store",
}
# resources keys GPU Scout maps (autostop: to a note).
_RESOURCES_MAPPED = frozenset({
    "accelerators", "gpus", "any_of", "ordered", "cpus", "memory", "use_spot",
    "instance_type", "cloud", "infra", "region", "zone", "autostop", "job_recovery",
    "spot_recovery",
})
# resources keys accepted and ignored, with the note that says so.
_RESOURCES_NOTED = {
    "disk_size": "ignored (GPU Scout uses the image's root volume)",
    "ephemeral_storage": "ignored (GPU Scout uses the image's root volume)",
    "disk_tier": "ignored (GPU Scout uses the image's root volume)",
    "labels": "ignored (GPU Scout tags its instances itself)",
}

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|git@")
_GPU_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_GPU_MEMORY = re.compile(r"[0-9]+[GgMmTt][Bb]\+?")
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGTP]B?|B)?\s*(\+?)\s*",
                     re.IGNORECASE)
_MEMORY_UNITS_GB = {"B": 2.0**-30, "K": 2.0**-20, "M": 2.0**-10, "G": 1.0, "T": 2.0**10,
                    "P": 2.0**20}
_NAME_MAX = 200


def from_skypilot(data: dict[str, Any], *,
                  default_name: str = DEFAULT_NAME) -> SkyPilotMapping:
    """Maps a parsed SkyPilot task file to a GPU Scout job body.

    ``data`` is the mapping ``yaml.safe_load`` gives for one task
    (https://docs.skypilot.co/en/latest/reference/yaml-spec.html). ``default_name``
    names the job when the file has no ``name`` (the CLI can pass the file's stem).

    Mapped: ``name``, ``run`` -> ``command`` (required), ``setup``, ``workdir`` (a local
    path; ``$VAR``/``${VAR}`` filled in from envs and secrets, as SkyPilot does),
    ``envs``, ``secrets``, ``num_nodes`` (1 only), and under ``resources``:
    ``accelerators`` (or its alias ``gpus``) -> ``gpus`` + ``gpu_type``, ``use_spot`` ->
    ``capacity``, ``cpus``, ``memory`` -> ``memory_gb``, ``instance_type``, ``region``,
    ``zone``, ``cloud``/``infra`` (AWS only), ``job_recovery`` (or the older
    ``spot_recovery``) ``.max_restarts_on_errors`` -> ``max_restarts_on_errors``.
    Noted and ignored: ``disk_size``, ``disk_tier``, ``labels``, ``autostop``, the
    recovery ``strategy``. Anything else raises ``TaskFileError`` naming the key.
    """
    if not isinstance(data, dict):
        raise TaskFileError("", "a SkyPilot task file is a mapping of task fields "
                                f"(name, resources, setup, run, ...), not {_kind(data)}")
    notes: list[str] = []
    body: dict[str, Any] = {}

    for key, value in data.items():
        path = str(key)
        if path in _TOP_MAPPED:
            continue
        if path in _TOP_REFUSED:
            if _is_empty(value):
                notes.append(f"{path}: empty; ignored")
                continue
            raise TaskFileError(path, _TOP_REFUSED[path])
        if path == "command":
            raise TaskFileError("run", "both run (SkyPilot) and command (GPU Scout) given; "
                                       "a job file is one or the other")
        raise TaskFileError(path, "not a SkyPilot task key GPU Scout knows; it maps "
                                  + ", ".join(_TOP_MAPPED))

    _num_nodes(data.get("num_nodes"))

    body["name"] = _name(data.get("name"), default_name, notes)
    body["command"] = _run(data.get("run"))
    setup = data.get("setup")
    if setup is not None:
        if not isinstance(setup, str):
            raise TaskFileError("setup", f"must be a shell script (a string), not {_kind(setup)}")
        if setup.strip():
            body["setup"] = setup
        else:
            notes.append("setup: empty; ignored")

    envs = _env_map("envs", data.get("envs"))
    secrets = _env_map("secrets", data.get("secrets"))
    workdir = data.get("workdir")
    if workdir is not None:
        body["workdir"] = _workdir(workdir, {**envs, **secrets}, notes)
    if envs:
        body["envs"] = envs
    if secrets:
        body["secrets"] = secrets

    resources, restarts = _resources(data.get("resources"), notes)
    if restarts is not None:
        body["max_restarts_on_errors"] = restarts
    if resources:
        body["resources"] = resources
    return SkyPilotMapping(body=body, notes=tuple(notes))


# --- top-level fields -------------------------------------------------------------------


def _num_nodes(value: Any) -> None:
    if value is None or (_is_int(value) and value == 1):
        return
    if _is_int(value) and value > 1:
        raise TaskFileError("num_nodes", f"{value} nodes asked; GPU Scout runs single-node "
                                         "jobs (num_nodes: 1)")
    raise TaskFileError("num_nodes", f"must be 1 (GPU Scout runs single-node jobs), "
                                     f"not {value!r}")


def _name(value: Any, default_name: str, notes: list[str]) -> str:
    if value is None:
        notes.append(f"name not set: the job is named {default_name!r}")
        return default_name
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError("name", f"must be a non-blank string, not {value!r}")
    if len(value) > _NAME_MAX:
        raise TaskFileError("name", f"{len(value)} characters; at most {_NAME_MAX}")
    return value


def _run(value: Any) -> str:
    if value is None:
        raise TaskFileError("run", "missing; GPU Scout needs the command the job runs")
    if not isinstance(value, str):
        raise TaskFileError("run", f"must be a shell script (a string), not {_kind(value)}")
    if not value.strip():
        raise TaskFileError("run", "empty; GPU Scout needs the command the job runs")
    return value


def _env_map(section: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list) and section == "secrets":
        raise TaskFileError("secrets", "a list names SkyPilot-managed secrets, which GPU "
                                       "Scout cannot read; give NAME: value pairs")
    if not isinstance(value, dict):
        raise TaskFileError(section, f"must be a mapping of NAME: value, not {_kind(value)}")
    flag = "--env" if section == "envs" else "--secret"
    result: dict[str, str] = {}
    for key, item in value.items():
        name = str(key)
        path = f"{section}.{name}"
        if not _ENV_NAME.fullmatch(name):
            raise TaskFileError(path, "not a valid environment variable name "
                                      "(letters, digits and _; not starting with a digit)")
        if item is None:
            raise TaskFileError(path, f"no value (SkyPilot expects it from {flag} "
                                      f"{name}=...); give it a value in the file "
                                      f'({name}: "" for empty)')
        if isinstance(item, dict | list):
            raise TaskFileError(path, f"must be a string, not {_kind(item)}")
        # SkyPilot turns every value into a string the same way (str()).
        result[name] = str(item)
    return result


def _workdir(value: Any, variables: dict[str, str], notes: list[str]) -> str:
    if isinstance(value, dict):
        raise TaskFileError("workdir", "a git repository (url/ref) is not supported; "
                                       "give a local folder (workdir: path)")
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError("workdir", f"must be a local folder path, not {value!r}")
    if _URL.match(value):
        raise TaskFileError("workdir", f"{value!r} is a URL; give a local folder "
                                       "(GPU Scout uploads it)")

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    filled = _ENV_REF.sub(fill, value)
    if filled != value:
        notes.append(f"workdir: {value!r} read as {filled!r} (envs filled in, as SkyPilot does)")
    if not filled.startswith(("/", "~")):
        notes.append(f"workdir: {filled!r} is relative to the task file's folder "
                     "(SkyPilot reads it relative to the folder sky runs in)")
    return filled


# --- resources --------------------------------------------------------------------------


def _resources(value: Any, notes: list[str]) -> tuple[dict[str, Any], int | None]:
    """The body's ``resources`` and ``max_restarts_on_errors`` (None: not given)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TaskFileError("resources", f"must be a mapping, not {_kind(value)}")
    out: dict[str, Any] = {}
    restarts: int | None = None
    for raw_key, item in value.items():
        key = str(raw_key)
        path = f"resources.{key}"
        if key not in _RESOURCES_MAPPED | _RESOURCES_NOTED.keys() | _RESOURCES_REFUSED.keys():
            raise TaskFileError(path, "not a SkyPilot resources key GPU Scout knows")
        if item is None:  # SkyPilot reads a null as the key left out
            continue
        if key in _RESOURCES_REFUSED:
            raise TaskFileError(path, _RESOURCES_REFUSED[key])
        if key in _RESOURCES_NOTED:
            notes.append(f"{path}: {_RESOURCES_NOTED[key]}")
    given = {str(k): v for k, v in value.items() if v is not None}

    # Accelerators: the key, its alias, or candidates that differ only in them.
    if "accelerators" in given and "gpus" in given:
        raise TaskFileError("resources.gpus", "both gpus and accelerators given "
                                              "(gpus is SkyPilot's alias of accelerators)")
    accel_key = "accelerators" if "accelerators" in given else "gpus"
    candidates = _candidates(given, accel_key, notes)
    if candidates is not None:
        count, types = candidates
    elif accel_key in given:
        count, types = _accelerators(f"resources.{accel_key}", given[accel_key], notes)
    else:
        count, types = 0, []
    if types:
        out["gpus"] = count
        out["gpu_type"] = types[0] if len(types) == 1 else types

    if "cpus" in given:
        out["cpus"] = _amount("resources.cpus", given["cpus"], notes, memory=False)
    if "memory" in given:
        out["memory_gb"] = _amount("resources.memory", given["memory"], notes, memory=True)

    if "use_spot" in given:
        spot = given["use_spot"]
        if not isinstance(spot, bool):
            raise TaskFileError("resources.use_spot", f"must be true or false, not {spot!r}")
        out["capacity"] = "spot" if spot else "on-demand"
    else:
        notes.append("resources.use_spot not set: GPU Scout chooses spot or on-demand "
                     "by price and availability")

    if "instance_type" in given:
        out["instance_type"] = _string("resources.instance_type", given["instance_type"])
    out.update(_location(given, notes))

    if "autostop" in given:
        _autostop(given["autostop"], notes)
    if "job_recovery" in given and "spot_recovery" in given:
        raise TaskFileError("resources.spot_recovery", "both spot_recovery and job_recovery "
                                                       "given (spot_recovery is its old name)")
    for key in ("job_recovery", "spot_recovery"):
        if key in given:
            restarts = _job_recovery(f"resources.{key}", given[key], notes)
    return out, restarts


def _candidates(given: dict[str, Any], accel_key: str,
                notes: list[str]) -> tuple[int, list[str]] | None:
    """``any_of``/``ordered`` candidates that differ only in accelerators, as one list.

    None when neither key is given. Candidates that set anything else (infra, region,
    ...) would need several placements GPU Scout cannot express: an error.
    """
    present = [k for k in ("any_of", "ordered") if k in given]
    if not present:
        return None
    if len(present) == 2:
        raise TaskFileError("resources.ordered", "both any_of and ordered given")
    key = present[0]
    path = f"resources.{key}"
    if accel_key in given:
        raise TaskFileError(path, f"given with resources.{accel_key}; list the GPU types "
                                  "in one of them")
    items = given[key]
    if not isinstance(items, list) or not items:
        raise TaskFileError(path, "must be a non-empty list of resource candidates")
    specs: list[str] = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        if not isinstance(item, dict):
            raise TaskFileError(where, f"must be a mapping, not {_kind(item)}")
        keys = {str(k) for k, v in item.items() if v is not None}
        other = sorted(keys - {"accelerators", "gpus"})
        if other:
            raise TaskFileError(f"{where}.{other[0]}", "GPU Scout takes candidates that "
                                "differ only in accelerators; set the other fields once, "
                                "outside the candidates")
        if keys != {"accelerators"} and keys != {"gpus"}:
            raise TaskFileError(where, "each candidate names its accelerators "
                                       "(and nothing else)")
        inner = "accelerators" if "accelerators" in keys else "gpus"
        value = item[inner]
        if not isinstance(value, str):
            raise TaskFileError(f"{where}.{inner}", "one NAME:COUNT per candidate")
        specs.append(value)
    count, types = _accelerators(path, specs, [])
    if len(types) > 1:
        if key == "ordered":
            notes.append(f"{path}: an ordered preference; GPU Scout takes any of "
                         f"{', '.join(types)}, whichever costs least per unit of work")
        else:
            notes.append(f"{path}: read as accelerators any of {', '.join(types)}")
    return count, types


def _accelerators(path: str, value: Any, notes: list[str]) -> tuple[int, list[str]]:
    """(count, [type, ...]) from SkyPilot's three accelerator forms.

    ``"V100"``, ``"V100:2"``; a list ``["V100:1", "A100:1"]`` (an ordered preference);
    a mapping ``{"V100": 1, "A100": 1}`` or the YAML flow set ``{V100:1, A100:1}``
    (which parses as ``{"V100:1": None, "A100:1": None}``): an unordered set.
    """
    pairs: list[tuple[str, Any]] = []
    if isinstance(value, str):
        pairs.append(_split_spec(path, value))
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise TaskFileError(path, f"list items are NAME:COUNT strings, not {item!r}")
            pairs.append(_split_spec(path, item))
    elif isinstance(value, dict):
        for name, count in value.items():
            if count is None:
                pairs.append(_split_spec(path, str(name)))
            else:
                pairs.append(_split_spec(path, str(name), count))
    else:
        raise TaskFileError(path, f"must be NAME, NAME:COUNT, a list or a mapping, "
                                  f"not {_kind(value)}")
    if not pairs:
        raise TaskFileError(path, "empty; leave it out for a job without GPUs")

    types: list[str] = []
    counts: dict[str, int] = {}
    for name, count in pairs:
        number = _gpu_count(path, name, count)
        if name in counts and counts[name] != number:
            raise TaskFileError(path, f"{name} given twice with different counts")
        if name not in counts:
            types.append(name)
        counts[name] = number
    distinct = sorted(set(counts.values()))
    if len(distinct) > 1:
        listed = ", ".join(f"{name}:{counts[name]}" for name in types)
        raise TaskFileError(path, f"alternatives ask different GPU counts ({listed}); "
                                  "GPU Scout takes one count for any of the types")
    if isinstance(value, list) and len(types) > 1:
        notes.append(f"{path}: an ordered preference; GPU Scout takes any of "
                     f"{', '.join(types)}, whichever costs least per unit of work")
    return distinct[0], types


def _split_spec(path: str, spec: str, count: Any = None) -> tuple[str, Any]:
    text = spec.strip()
    parts = text.split(":")
    if any(_GPU_MEMORY.fullmatch(p.strip()) for p in parts):
        raise TaskFileError(path, f"{spec!r} selects GPUs by memory size; name the GPU "
                                  "types instead (e.g. [A100-80GB:1, H100:1])")
    if len(parts) > 2 or (len(parts) == 2 and count is not None):
        raise TaskFileError(path, f"{spec!r} is not NAME or NAME:COUNT")
    name = parts[0].strip()
    if len(parts) == 2:
        count = parts[1].strip()
    if not _GPU_NAME.fullmatch(name):
        raise TaskFileError(path, f"{spec!r} is not NAME or NAME:COUNT")
    if name.lower().startswith("tpu"):
        raise TaskFileError(path, f"{name} is a TPU (Google Cloud only); GPU Scout runs "
                                  "on AWS GPUs")
    return name, (1 if count is None else count)


def _gpu_count(path: str, name: str, count: Any) -> int:
    number: float
    if isinstance(count, bool):
        raise TaskFileError(path, f"{name}: count must be a number, not {count!r}")
    if isinstance(count, int | float):
        number = float(count)
    else:
        try:
            number = float(str(count))
        except ValueError:
            raise TaskFileError(path, f"{name}: count {count!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise TaskFileError(path, f"{name}: count must be a positive number, not {count!r}")
    if not number.is_integer():
        raise TaskFileError(path, f"{name}:{count} asks part of a GPU; GPU Scout runs "
                                  "jobs on whole GPUs")
    return int(number)


def _amount(path: str, value: Any, notes: list[str], *, memory: bool) -> float:
    """cpus (a count) or memory (GB): ``4``, ``"4"``, ``"4+"``; memory also ``"64GB"``."""
    unit = " GB" if memory else ""
    at_least = False
    number: float
    if isinstance(value, bool):
        raise TaskFileError(path, f"must be a number or a string like '4+', not {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if memory:
            match = _MEMORY.fullmatch(text)
            if match is None:
                raise TaskFileError(path, f"{value!r} is not N, N+ or N with a unit "
                                          "(KB, MB, GB, TB, PB), e.g. 32+ or 64GB")
            factor = _MEMORY_UNITS_GB[(match.group(2) or "G")[0].upper()]
            number = float(match.group(1)) * factor
            at_least = match.group(3) == "+"
        else:
            at_least = text.endswith("+")
            digits = text[:-1] if at_least else text
            try:
                number = float(digits)
            except ValueError:
                raise TaskFileError(path, f"{value!r} is not N or N+ (e.g. 4 or 4+)") from None
    else:
        raise TaskFileError(path, f"must be a number or a string like '4+', not {_kind(value)}")
    if not math.isfinite(number) or number <= 0:
        raise TaskFileError(path, f"must be more than 0, not {value!r}")
    if not at_least:
        notes.append(f"{path}: {value} (exactly, in SkyPilot) read as at least {number:g}{unit};"
                     " GPU Scout takes minimums")
    return number


def _location(given: dict[str, Any], notes: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if "infra" in given:
        for key in ("cloud", "region", "zone"):
            if key in given:
                raise TaskFileError("resources.infra", f"given with resources.{key}; "
                                                       "infra says cloud/region/zone in one")
        infra = given["infra"]
        if not isinstance(infra, str) or not infra.strip():
            raise TaskFileError("resources.infra", f"must be a string like aws/us-east-1, "
                                                   f"not {infra!r}")
        parts = [p.strip() for p in infra.strip().split("/")]
        cloud = parts[0]
        if cloud.lower() in ("k8s", "kubernetes"):
            raise TaskFileError("resources.infra", f"{infra!r} is Kubernetes; GPU Scout runs "
                                                   "jobs on AWS (infra: aws)")
        if len(parts) > 3 or not all(parts):
            raise TaskFileError("resources.infra", f"{infra!r} is not "
                                                   "cloud[/region[/zone]]")
        _check_cloud("resources.infra", cloud, notes)
        if len(parts) > 1 and parts[1] != "*":
            out["region"] = parts[1]
        if len(parts) > 2 and parts[2] != "*":
            out["zone"] = parts[2]
    else:
        if "cloud" in given:
            cloud = _string("resources.cloud", given["cloud"])
            if cloud.strip() == "*":
                raise TaskFileError("resources.cloud", "'*' is not a cloud (infra takes "
                                                       "wildcards); use cloud: aws")
            _check_cloud("resources.cloud", cloud.strip(), notes)
        if "region" in given:
            out["region"] = _string("resources.region", given["region"])
        if "zone" in given:
            out["zone"] = _string("resources.zone", given["zone"])
    region, zone = out.get("region"), out.get("zone")
    if region and zone and not zone.startswith(region):
        key = "resources.infra" if "infra" in given else "resources.zone"
        raise TaskFileError(key, f"zone {zone} is not in region {region}")
    return out


def _check_cloud(path: str, cloud: str, notes: list[str]) -> None:
    if cloud == "*":
        notes.append(f"{path}: '*' (any cloud): GPU Scout runs jobs on AWS")
        return
    if cloud.lower() != "aws":
        raise TaskFileError(path, f"{cloud!r} asked; GPU Scout runs jobs on AWS "
                                  "(aws, or leave it out)")


def _autostop(value: Any, notes: list[str]) -> None:
    if isinstance(value, dict) and value.get("hook") is not None:
        raise TaskFileError("resources.autostop.hook", "GPU Scout runs no hook when it "
                                                       "releases an instance")
    notes.append("resources.autostop: ignored (GPU Scout releases the instance when the "
                 "job ends)")


def _job_recovery(path: str, value: Any, notes: list[str]) -> int | None:
    if path.endswith("spot_recovery"):
        notes.append(f"{path}: read as resources.job_recovery (its newer name)")
    if isinstance(value, str):
        notes.append(f"{path}: strategy {value} ignored (GPU Scout recovers "
                     "make-before-break)")
        return None
    if not isinstance(value, dict):
        raise TaskFileError(path, f"must be a strategy name or a mapping, not {_kind(value)}")
    restarts: int | None = None
    for key, item in value.items():
        where = f"{path}.{key}"
        if item is None:
            continue
        if key == "strategy":
            notes.append(f"{where}: {item} ignored (GPU Scout recovers make-before-break)")
        elif key == "max_restarts_on_errors":
            if not _is_int(item) or item < 0:
                raise TaskFileError(where, f"must be a whole number, 0 or more, not {item!r}")
            restarts = int(item)
        elif key == "recover_on_exit_codes":
            raise TaskFileError(where, "GPU Scout restarts on any error, up to "
                                       "max_restarts_on_errors; it has no exit codes "
                                       "that always restart")
        else:
            raise TaskFileError(where, "not a job_recovery key GPU Scout knows "
                                       "(strategy, max_restarts_on_errors)")
    return restarts


# --- small helpers ------------------------------------------------------------------------


def _string(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(path, f"must be a non-blank string, not {value!r}")
    return value.strip()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, dict | list | str) and not value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return repr(value)
