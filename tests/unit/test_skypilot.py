"""SkyPilot task files read as GPU Scout jobs: table tests of each mapping rule,
and five example task files under data/skypilot/ with their exact job bodies."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from gpuscout.skypilot import (
    SkyPilotMapping,
    TaskFileError,
    from_skypilot,
    looks_like_skypilot,
)

DATA = Path(__file__).parent / "data" / "skypilot"
SPOT_NOTE = ("resources.use_spot not set: GPU Scout chooses spot or on-demand by price "
             "and availability")


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DATA / name).read_text())
    assert isinstance(data, dict)
    return data


def task(text: str) -> dict[str, Any]:
    """A task from YAML text, with ``run`` and ``name`` added when missing."""
    data = yaml.safe_load(text) or {}
    data.setdefault("run", "python train.py")
    data.setdefault("name", "t")
    return data


def resources_of(text: str) -> dict[str, Any]:
    body = from_skypilot(task(text)).body
    return body.get("resources", {})


def error_of(data: dict[str, Any]) -> TaskFileError:
    with pytest.raises(TaskFileError) as info:
        from_skypilot(data)
    return info.value


# --- the five example task files --------------------------------------------------------


def test_gpu_training_with_workdir_setup_and_envs() -> None:
    mapping = from_skypilot(load("train_gpu.yaml"))
    assert mapping.body == {
        "name": "resnet-train",
        "command": "python train.py --epochs $EPOCHS --lr $LR --data $DATA_BUCKET\n",
        "setup": "pip install -r requirements.txt\n",
        "workdir": "./code",
        "envs": {"EPOCHS": "10", "LR": "0.001",
                 "DATA_BUCKET": "s3://example-datasets/imagenet"},
        "resources": {"gpus": 1, "gpu_type": "V100", "cpus": 8.0, "memory_gb": 32.0},
    }
    assert mapping.notes == (
        "workdir: './code' is relative to the task file's folder "
        "(SkyPilot reads it relative to the folder sky runs in)",
        "resources.disk_size: ignored (GPU Scout uses the image's root volume)",
        SPOT_NOTE,
    )


def test_spot_job_with_recovery() -> None:
    mapping = from_skypilot(load("spot.yaml"))
    assert mapping.body == {
        "name": "bert-finetune",
        "command": "python finetune.py --resume",
        "secrets": {"HF_TOKEN": "hf-placeholder-token"},
        "max_restarts_on_errors": 3,
        "resources": {"gpus": 1, "gpu_type": "T4", "capacity": "spot",
                      "region": "us-east-1"},
    }
    assert mapping.notes == (
        "resources.job_recovery.strategy: EAGER_NEXT_REGION ignored "
        "(GPU Scout recovers make-before-break)",
    )


def test_set_of_accelerators() -> None:
    mapping = from_skypilot(load("any_gpu.yaml"))
    assert mapping.body == {
        "name": "llm-eval",
        "command": "python eval.py",
        "resources": {"gpus": 1, "gpu_type": ["V100", "A100"], "memory_gb": 64.0},
    }
    assert mapping.notes == (
        "resources.memory: 64GB (exactly, in SkyPilot) read as at least 64 GB; "
        "GPU Scout takes minimums",
        SPOT_NOTE,
    )


def test_cpu_only_job() -> None:
    mapping = from_skypilot(load("cpu_only.yaml"))
    assert mapping.body == {
        "name": "preprocess",
        "command": "python preprocess.py --workers 4",
        "resources": {"cpus": 4.0, "capacity": "on-demand"},
    }
    assert mapping.notes == ()


def test_multinode_job_is_refused() -> None:
    error = error_of(load("multinode.yaml"))
    assert error.key == "num_nodes"
    assert str(error) == ("num_nodes: 4 nodes asked; GPU Scout runs single-node jobs "
                          "(num_nodes: 1)")


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.yaml")))
def test_example_files_look_like_skypilot(name: str) -> None:
    assert looks_like_skypilot(load(name))


def test_there_are_five_example_files() -> None:
    assert len(list(DATA.glob("*.yaml"))) == 5


# --- looks_like_skypilot ------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    ({"run": "x"}, True),
    ({"command": "x"}, False),
    ({"name": "j", "command": "x", "resources": {"gpus": 1, "gpu_type": "V100"}}, False),
    ({"num_nodes": 2}, True),
    ({"file_mounts": {"/data": "s3://b"}}, True),
    ({"resources": {"accelerators": "V100"}}, True),
    ({"resources": {"use_spot": True}}, True),
    ({"resources": {"infra": "aws"}}, True),
    ({"resources": {"cloud": "aws"}}, True),
    ({"resources": {"memory": "32+"}}, True),
    ({"resources": {"gpus": "V100:1"}}, True),
    ({"resources": {"gpus": 2}}, False),
    ({"resources": {"cpus": 4}}, False),
    ({"name": "j"}, False),
    ({}, False),
])
def test_looks_like_skypilot(data: dict[str, Any], expected: bool) -> None:
    assert looks_like_skypilot(data) is expected


def test_both_run_and_command_is_an_error() -> None:
    with pytest.raises(TaskFileError) as info:
        looks_like_skypilot({"run": "a", "command": "b"})
    assert info.value.key == "run"
    assert error_of({"run": "a", "command": "b"}).key == "run"


def test_not_a_mapping() -> None:
    assert looks_like_skypilot(["run"]) is False  # type: ignore[arg-type]
    error = error_of(["run"])  # type: ignore[arg-type]
    assert error.key == ""
    assert str(error).startswith("a SkyPilot task file is a mapping")


# --- TaskFileError and SkyPilotMapping -------------------------------------------------------


def test_error_is_a_value_error_with_a_key_and_one_line() -> None:
    error = TaskFileError("resources.accelerators", "bad")
    assert isinstance(error, ValueError)
    assert (error.key, error.message, str(error)) == (
        "resources.accelerators", "bad", "resources.accelerators: bad")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.key, str(copy)) == (error.key, str(error))


def test_mapping_is_frozen() -> None:
    mapping = from_skypilot({"run": "x", "name": "n"})
    assert isinstance(mapping, SkyPilotMapping)
    with pytest.raises(AttributeError):
        mapping.notes = ()  # type: ignore[misc]


@pytest.mark.parametrize("data", [
    {"run": "x", "num_nodes": 4, "resources": {"accelerators": "T4:0.5"}},
    {"run": "x", "resources": {"accelerators": {"A100": 2, "V100": 1}}},
    {"run": "x", "envs": {"A": None}},
    {"run": "x", "file_mounts": {"/a": "/b"}},
    {"run": "x", "resources": {"cloud": "gcp"}},
    {"run": "x", "resources": {"memory": "lots"}},
])
def test_error_messages_are_one_line_and_start_with_the_key(data: dict[str, Any]) -> None:
    error = error_of(data)
    assert "\n" not in str(error)
    assert str(error).startswith(f"{error.key}: ")


# --- name, run, setup ---------------------------------------------------------------------


def test_name_defaults_with_a_note() -> None:
    mapping = from_skypilot({"run": "x"})
    assert mapping.body["name"] == "sky-task"
    assert "name not set: the job is named 'sky-task'" in mapping.notes
    assert from_skypilot({"run": "x"}, default_name="train").body["name"] == "train"


@pytest.mark.parametrize("name", [123, "", "   ", "x" * 201, ["a"]])
def test_bad_names(name: Any) -> None:
    assert error_of({"run": "x", "name": name}).key == "name"


@pytest.mark.parametrize("data", [
    {"name": "j"},
    {"name": "j", "run": None},
    {"name": "j", "run": ""},
    {"name": "j", "run": "  \n"},
    {"name": "j", "run": ["python", "t.py"]},
])
def test_run_is_required(data: dict[str, Any]) -> None:
    assert error_of(data).key == "run"


def test_setup() -> None:
    assert from_skypilot(task("setup: pip install x")).body["setup"] == "pip install x"
    blank = from_skypilot(task("setup: ''"))
    assert "setup" not in blank.body
    assert "setup: empty; ignored" in blank.notes
    assert "setup" not in from_skypilot(task("setup:")).body
    assert error_of(task("setup: [a, b]")).key == "setup"


def test_only_given_keys_are_in_the_body() -> None:
    mapping = from_skypilot({"name": "j", "run": "x"})
    assert mapping.body == {"name": "j", "command": "x"}
    assert mapping.notes == (SPOT_NOTE,)


# --- workdir ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "workdir", "notes"), [
    ("workdir: /abs/code", "/abs/code", ()),
    ("workdir: ~/code", "~/code", ()),
    ("workdir: code", "code",
     ("workdir: 'code' is relative to the task file's folder "
      "(SkyPilot reads it relative to the folder sky runs in)",)),
    ("{workdir: '/src/${PROJECT}', envs: {PROJECT: demo}}", "/src/demo",
     ("workdir: '/src/${PROJECT}' read as '/src/demo' (envs filled in, as SkyPilot does)",)),
    ("{workdir: '/src/$PROJECT/$OTHER', secrets: {PROJECT: demo}}", "/src/demo/$OTHER",
     ("workdir: '/src/$PROJECT/$OTHER' read as '/src/demo/$OTHER' "
      "(envs filled in, as SkyPilot does)",)),
])
def test_workdir(text: str, workdir: str, notes: tuple[str, ...]) -> None:
    mapping = from_skypilot(task(text))
    assert mapping.body["workdir"] == workdir
    assert mapping.notes == (*notes, SPOT_NOTE)


@pytest.mark.parametrize("text", [
    "workdir: {url: 'https://github.com/org/repo.git', ref: main}",
    "workdir: https://github.com/org/repo.git",
    "workdir: git@github.com:org/repo.git",
    "workdir: s3://bucket/code",
    "workdir: ''",
    "workdir: 3",
])
def test_bad_workdir(text: str) -> None:
    assert error_of(task(text)).key == "workdir"


# --- envs and secrets -------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["envs", "secrets"])
def test_env_values_become_strings(section: str) -> None:
    data = task(f"{section}: {{A: 1, B: 2.5, C: true, D: text, E: ''}}")
    assert from_skypilot(data).body[section] == {
        "A": "1", "B": "2.5", "C": "True", "D": "text", "E": ""}


@pytest.mark.parametrize(("text", "key"), [
    ("envs: {HF_TOKEN: null}", "envs.HF_TOKEN"),
    ("envs: {HF_TOKEN: }", "envs.HF_TOKEN"),
    ("secrets: {WANDB_API_KEY: null}", "secrets.WANDB_API_KEY"),
    ("envs: {1BAD: x}", "envs.1BAD"),
    ("envs: {BAD-NAME: x}", "envs.BAD-NAME"),
    ("envs: {A: [1, 2]}", "envs.A"),
    ("envs: [A, B]", "envs"),
    ("envs: A=1", "envs"),
    ("secrets: [my-managed-secret]", "secrets"),
])
def test_bad_envs_and_secrets(text: str, key: str) -> None:
    assert error_of(task(text)).key == key


def test_null_env_message_says_where_skypilot_expects_it() -> None:
    assert str(error_of(task("envs: {HF_TOKEN: null}"))) == (
        'envs.HF_TOKEN: no value (SkyPilot expects it from --env HF_TOKEN=...); '
        'give it a value in the file (HF_TOKEN: "" for empty)')


def test_empty_envs_are_left_out() -> None:
    body = from_skypilot(task("{envs: {}, secrets: }")).body
    assert "envs" not in body and "secrets" not in body


# --- num_nodes --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["num_nodes: 1", "num_nodes:", ""])
def test_one_node_is_fine(text: str) -> None:
    from_skypilot(task(text))


@pytest.mark.parametrize("value", [4, 2, 0, -1, "2", 1.0, True])
def test_other_node_counts_are_refused(value: Any) -> None:
    data = task("")
    data["num_nodes"] = value
    assert error_of(data).key == "num_nodes"


# --- resources.accelerators -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "gpus", "gpu_type"), [
    ("accelerators: V100", 1, "V100"),
    ("accelerators: V100:2", 2, "V100"),
    ("accelerators: 'A100-80GB:8'", 8, "A100-80GB"),
    ("accelerators: V100:2.0", 2, "V100"),
    ("accelerators: {V100: 1}", 1, "V100"),
    ("accelerators: {V100: 4}", 4, "V100"),
    ("accelerators: {V100: }", 1, "V100"),
    ("accelerators: [V100:1]", 1, "V100"),
    ("accelerators: [V100:1, A100:1]", 1, ["V100", "A100"]),
    ("accelerators: [V100:2, A100:2, V100:2]", 2, ["V100", "A100"]),
    ("accelerators: {V100: 1, A100: 1}", 1, ["V100", "A100"]),
    ("accelerators: {V100:1, A100:1}", 1, ["V100", "A100"]),
    ("accelerators: {'L4:1', 'H100:1', 'A100:1'}", 1, ["L4", "H100", "A100"]),
    ("gpus: T4:1", 1, "T4"),
    ("gpus: [T4:1, L4:1]", 1, ["T4", "L4"]),
])
def test_accelerators(text: str, gpus: int, gpu_type: str | list[str]) -> None:
    resources = resources_of(f"resources:\n  {text}")
    assert resources == {"gpus": gpus, "gpu_type": gpu_type}


def test_an_ordered_list_is_read_as_any_of_with_a_note() -> None:
    notes = from_skypilot(task("resources: {accelerators: [V100:1, A100:1]}")).notes
    assert ("resources.accelerators: an ordered preference; GPU Scout takes any of "
            "V100, A100, whichever costs least per unit of work") in notes
    set_notes = from_skypilot(task("resources: {accelerators: {V100:1, A100:1}}")).notes
    assert set_notes == (SPOT_NOTE,)


@pytest.mark.parametrize(("text", "key"), [
    ("accelerators: T4:0.5", "resources.accelerators"),
    ("accelerators: {T4: 0.5}", "resources.accelerators"),
    ("accelerators: [V100:1, A100:2]", "resources.accelerators"),
    ("accelerators: {V100: 1, A100: 2}", "resources.accelerators"),
    ("accelerators: [V100:1, V100:2]", "resources.accelerators"),
    ("accelerators: V100:0", "resources.accelerators"),
    ("accelerators: V100:-1", "resources.accelerators"),
    ("accelerators: V100:many", "resources.accelerators"),
    ("accelerators: V100:1:2", "resources.accelerators"),
    ("accelerators: {V100:1: 2}", "resources.accelerators"),
    ("accelerators: {V100: true}", "resources.accelerators"),
    ("accelerators: 80GB+", "resources.accelerators"),
    ("accelerators: 'nvidia:80GB+:1'", "resources.accelerators"),
    ("accelerators: tpu-v2-8", "resources.accelerators"),
    ("accelerators: []", "resources.accelerators"),
    ("accelerators: {}", "resources.accelerators"),
    ("accelerators: [[V100]]", "resources.accelerators"),
    ("accelerators: 2", "resources.accelerators"),
    ("accelerators: 'V100 x2'", "resources.accelerators"),
    ("gpus: 2", "resources.gpus"),
    ("{gpus: V100, accelerators: V100}", "resources.gpus"),
])
def test_bad_accelerators(text: str, key: str) -> None:
    resources = text if text.startswith("{") else f"{{{text}}}"
    assert error_of(task(f"resources: {resources}")).key == key


def test_different_counts_message() -> None:
    assert str(error_of(task("resources: {accelerators: {V100: 1, A100: 2}}"))) == (
        "resources.accelerators: alternatives ask different GPU counts (V100:1, A100:2); "
        "GPU Scout takes one count for any of the types")


# --- resources.any_of / ordered -----------------------------------------------------------------


def test_candidates_that_differ_only_in_accelerators() -> None:
    mapping = from_skypilot(task(
        "resources: {any_of: [{accelerators: A100:8}, {gpus: H100:8}]}"))
    assert mapping.body["resources"] == {"gpus": 8, "gpu_type": ["A100", "H100"]}
    assert "resources.any_of: read as accelerators any of A100, H100" in mapping.notes
    ordered = from_skypilot(task(
        "resources: {ordered: [{accelerators: L4:1}, {accelerators: T4:1}]}"))
    assert ordered.body["resources"] == {"gpus": 1, "gpu_type": ["L4", "T4"]}
    assert ("resources.ordered: an ordered preference; GPU Scout takes any of L4, T4, "
            "whichever costs least per unit of work") in ordered.notes


@pytest.mark.parametrize(("text", "key"), [
    ("{any_of: [{infra: aws/us-west-2}, {infra: gcp/us-central1}], accelerators: H100}",
     "resources.any_of"),
    ("{any_of: [{infra: aws/us-west-2, accelerators: H100}]}", "resources.any_of[0].infra"),
    ("{ordered: [{infra: aws/us-east-1}, {infra: aws/us-west-2}]}",
     "resources.ordered[0].infra"),
    ("{any_of: [{accelerators: A100:8}, {accelerators: H100:4}]}", "resources.any_of"),
    ("{any_of: [{accelerators: A100:8}], ordered: [{accelerators: A100:8}]}",
     "resources.ordered"),
    ("{any_of: []}", "resources.any_of"),
    ("{any_of: A100}", "resources.any_of"),
    ("{any_of: [A100]}", "resources.any_of[0]"),
    ("{any_of: [{}]}", "resources.any_of[0]"),
    ("{any_of: [{accelerators: [A100:1, H100:1]}]}", "resources.any_of[0].accelerators"),
])
def test_candidates_refused(text: str, key: str) -> None:
    assert error_of(task(f"resources: {text}")).key == key


# --- resources.use_spot -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "capacity"), [
    ("{use_spot: true}", "spot"),
    ("{use_spot: false}", "on-demand"),
])
def test_use_spot(text: str, capacity: str) -> None:
    mapping = from_skypilot(task(f"resources: {text}"))
    assert mapping.body["resources"] == {"capacity": capacity}
    assert SPOT_NOTE not in mapping.notes


@pytest.mark.parametrize("text", ["", "resources:", "resources: {use_spot: null}"])
def test_use_spot_not_set(text: str) -> None:
    mapping = from_skypilot(task(text))
    assert "capacity" not in mapping.body.get("resources", {})
    assert SPOT_NOTE in mapping.notes


@pytest.mark.parametrize("value", ["'yes'", "1", "spot"])
def test_bad_use_spot(value: str) -> None:
    assert error_of(task(f"resources: {{use_spot: {value}}}")).key == "resources.use_spot"


# --- resources.cpus / memory ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "value", "exact"), [
    ("cpus: 4", "cpus", 4.0, True),
    ("cpus: 0.5", "cpus", 0.5, True),
    ("cpus: '4'", "cpus", 4.0, True),
    ("cpus: 4+", "cpus", 4.0, False),
    ("cpus: 16+", "cpus", 16.0, False),
    ("memory: 32", "memory_gb", 32.0, True),
    ("memory: 7.5", "memory_gb", 7.5, True),
    ("memory: 16+", "memory_gb", 16.0, False),
    ("memory: 64GB", "memory_gb", 64.0, True),
    ("memory: 64gb+", "memory_gb", 64.0, False),
    ("memory: 1024MB", "memory_gb", 1.0, True),
    ("memory: 1TB+", "memory_gb", 1024.0, False),
    ("memory: 2G", "memory_gb", 2.0, True),
])
def test_cpus_and_memory(text: str, key: str, value: float, exact: bool) -> None:
    mapping = from_skypilot(task(f"resources: {{{text}}}"))
    assert mapping.body["resources"] == {key: value}
    assert isinstance(mapping.body["resources"][key], float)
    exact_notes = [n for n in mapping.notes if "(exactly, in SkyPilot)" in n]
    assert bool(exact_notes) is exact


def test_exact_cpus_note() -> None:
    assert ("resources.cpus: 4 (exactly, in SkyPilot) read as at least 4; "
            "GPU Scout takes minimums") in from_skypilot(task("resources: {cpus: 4}")).notes


@pytest.mark.parametrize(("text", "key"), [
    ("cpus: lots", "resources.cpus"),
    ("cpus: 4++", "resources.cpus"),
    ("cpus: 0", "resources.cpus"),
    ("cpus: -2", "resources.cpus"),
    ("cpus: '0+'", "resources.cpus"),
    ("cpus: nan", "resources.cpus"),
    ("cpus: true", "resources.cpus"),
    ("cpus: [4]", "resources.cpus"),
    ("memory: lots", "resources.memory"),
    ("memory: 64GiB", "resources.memory"),
    ("memory: 0", "resources.memory"),
    ("memory: 0GB+", "resources.memory"),
    ("memory: '+32'", "resources.memory"),
    ("memory: {size: 32}", "resources.memory"),
])
def test_bad_cpus_and_memory(text: str, key: str) -> None:
    assert error_of(task(f"resources: {{{text}}}")).key == key


# --- resources: instance type and location ------------------------------------------------------


@pytest.mark.parametrize(("text", "expected", "notes"), [
    ("{instance_type: p3.2xlarge}", {"instance_type": "p3.2xlarge"}, ()),
    ("{cloud: aws}", {}, ()),
    ("{cloud: AWS, region: us-west-2}", {"region": "us-west-2"}, ()),
    ("{region: us-east-1, zone: us-east-1b}", {"region": "us-east-1", "zone": "us-east-1b"},
     ()),
    ("{zone: us-east-1b}", {"zone": "us-east-1b"}, ()),
    ("{infra: aws}", {}, ()),
    ("{infra: aws/us-east-1}", {"region": "us-east-1"}, ()),
    ("{infra: aws/us-east-1/us-east-1a}", {"region": "us-east-1", "zone": "us-east-1a"}, ()),
    ("{infra: 'aws/*/us-east-1a'}", {"zone": "us-east-1a"}, ()),
    ("{infra: 'aws/*'}", {}, ()),
    ("{infra: '*'}", {}, ("resources.infra: '*' (any cloud): GPU Scout runs jobs on AWS",)),
    ("{infra: '*/us-west-2'}", {"region": "us-west-2"},
     ("resources.infra: '*' (any cloud): GPU Scout runs jobs on AWS",)),
])
def test_instance_type_and_location(text: str, expected: dict[str, str],
                                    notes: tuple[str, ...]) -> None:
    mapping = from_skypilot(task(f"resources: {text}"))
    assert mapping.body.get("resources", {}) == expected
    assert mapping.notes == (SPOT_NOTE, *notes)


@pytest.mark.parametrize(("text", "key"), [
    ("{cloud: gcp}", "resources.cloud"),
    ("{cloud: azure}", "resources.cloud"),
    ("{cloud: kubernetes}", "resources.cloud"),
    ("{cloud: '*'}", "resources.cloud"),
    ("{cloud: 3}", "resources.cloud"),
    ("{infra: gcp}", "resources.infra"),
    ("{infra: gcp/us-central1}", "resources.infra"),
    ("{infra: k8s}", "resources.infra"),
    ("{infra: kubernetes/my-context}", "resources.infra"),
    ("{infra: aws/a/b/c}", "resources.infra"),
    ("{infra: 'aws//us-east-1a'}", "resources.infra"),
    ("{infra: aws, cloud: aws}", "resources.infra"),
    ("{infra: aws, region: us-east-1}", "resources.infra"),
    ("{infra: aws/us-east-1/us-west-2a}", "resources.infra"),
    ("{region: us-east-1, zone: us-west-2a}", "resources.zone"),
    ("{region: ''}", "resources.region"),
    ("{zone: 1}", "resources.zone"),
    ("{instance_type: 4}", "resources.instance_type"),
])
def test_bad_instance_type_and_location(text: str, key: str) -> None:
    assert error_of(task(f"resources: {text}")).key == key


def test_other_cloud_message() -> None:
    assert str(error_of(task("resources: {cloud: gcp}"))) == (
        "resources.cloud: 'gcp' asked; GPU Scout runs jobs on AWS (aws, or leave it out)")


# --- resources: ignored with a note -------------------------------------------------------------


@pytest.mark.parametrize(("text", "note"), [
    ("{disk_size: 256}", "resources.disk_size: ignored (GPU Scout uses the image's root volume)"),
    ("{disk_tier: best}", "resources.disk_tier: ignored (GPU Scout uses the image's root volume)"),
    ("{labels: {team: ml}}", "resources.labels: ignored (GPU Scout tags its instances itself)"),
    ("{autostop: 10m}",
     "resources.autostop: ignored (GPU Scout releases the instance when the job ends)"),
    ("{autostop: {idle_minutes: 10, down: true}}",
     "resources.autostop: ignored (GPU Scout releases the instance when the job ends)"),
])
def test_ignored_with_a_note(text: str, note: str) -> None:
    mapping = from_skypilot(task(f"resources: {text}"))
    assert "resources" not in mapping.body
    assert note in mapping.notes


def test_null_resource_values_are_left_out() -> None:
    mapping = from_skypilot(task("resources: {ports: null, image_id: null, disk_size: null}"))
    assert "resources" not in mapping.body
    assert mapping.notes == (SPOT_NOTE,)


# --- resources.job_recovery ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "restarts", "notes"), [
    ("{job_recovery: {max_restarts_on_errors: 3}}", 3, ()),
    ("{job_recovery: {max_restarts_on_errors: 0}}", 0, ()),
    ("{job_recovery: {strategy: FAILOVER, max_restarts_on_errors: 2}}", 2,
     ("resources.job_recovery.strategy: FAILOVER ignored "
      "(GPU Scout recovers make-before-break)",)),
    ("{job_recovery: FAILOVER}", None,
     ("resources.job_recovery: strategy FAILOVER ignored "
      "(GPU Scout recovers make-before-break)",)),
    ("{job_recovery: {strategy: null}}", None, ()),
    ("{spot_recovery: {max_restarts_on_errors: 1}}", 1,
     ("resources.spot_recovery: read as resources.job_recovery (its newer name)",)),
])
def test_job_recovery(text: str, restarts: int | None, notes: tuple[str, ...]) -> None:
    mapping = from_skypilot(task(f"resources: {text}"))
    assert mapping.body.get("max_restarts_on_errors") == restarts
    assert ("max_restarts_on_errors" in mapping.body) is (restarts is not None)
    assert "resources" not in mapping.body
    assert mapping.notes == (SPOT_NOTE, *notes)


@pytest.mark.parametrize(("text", "key"), [
    ("{job_recovery: {max_restarts_on_errors: -1}}",
     "resources.job_recovery.max_restarts_on_errors"),
    ("{job_recovery: {max_restarts_on_errors: 1.5}}",
     "resources.job_recovery.max_restarts_on_errors"),
    ("{job_recovery: {max_restarts_on_errors: true}}",
     "resources.job_recovery.max_restarts_on_errors"),
    ("{job_recovery: {recover_on_exit_codes: [33]}}",
     "resources.job_recovery.recover_on_exit_codes"),
    ("{job_recovery: {retries: 3}}", "resources.job_recovery.retries"),
    ("{job_recovery: 3}", "resources.job_recovery"),
    ("{job_recovery: FAILOVER, spot_recovery: FAILOVER}", "resources.spot_recovery"),
])
def test_bad_job_recovery(text: str, key: str) -> None:
    assert error_of(task(f"resources: {text}")).key == key


# --- refused keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key"), [
    ("{ports: 8080}", "resources.ports"),
    ("{ports: [8080, 10022-10040]}", "resources.ports"),
    ("{image_id: ami-0868a20f5a3bf9702}", "resources.image_id"),
    ("{image_id: 'docker:ubuntu:latest'}", "resources.image_id"),
    ("{accelerator_args: {runtime_version: tpu-vm-base}}", "resources.accelerator_args"),
    ("{network_tier: best}", "resources.network_tier"),
    ("{max_hourly_cost: 10.0}", "resources.max_hourly_cost"),
    ("{priority: 5}", "resources.priority"),
    ("{autostop: {idle_minutes: 10, hook: 'git push'}}", "resources.autostop.hook"),
    ("{instance: p3.2xlarge}", "resources.instance"),
    ("{gpu_type: V100}", "resources.gpu_type"),
    ("{foo: null}", "resources.foo"),
    ("[V100]", "resources"),
])
def test_refused_resources(text: str, key: str) -> None:
    assert error_of(task(f"resources: {text}")).key == key


@pytest.mark.parametrize(("text", "key"), [
    ("file_mounts: {/remote/path: /local/path}", "file_mounts"),
    ("file_mounts: {/datasets-s3: 's3://my-awesome-dataset'}", "file_mounts"),
    ("storage: {name: bucket}", "storage"),
    ("service: {readiness_probe: /v1/models}", "service"),
    ("config: {kubernetes: {provision_timeout: 600}}", "config"),
    ("experimental: {config_overrides: {a: 1}}", "experimental"),
    ("event_callback: echo done", "event_callback"),
    ("volumes: {/mnt/data: vol}", "volumes"),
    ("pool: {workers: 2}", "pool"),
    ("managed_secrets: [my-secret]", "managed_secrets"),
    ("docker_image: ubuntu", "docker_image"),
    ("expected_duration_hours: 3", "expected_duration_hours"),
    ("unknown:", "unknown"),
])
def test_refused_top_level_keys(text: str, key: str) -> None:
    assert error_of(task(text)).key == key


@pytest.mark.parametrize("text", ["file_mounts: {}", "file_mounts:", "config: {}"])
def test_empty_refused_keys_are_noted(text: str) -> None:
    key = text.split(":")[0]
    assert f"{key}: empty; ignored" in from_skypilot(task(text)).notes
