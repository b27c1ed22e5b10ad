"""LocalProvider and bootstrap.sh against real processes.

The provider tests boot the real agent (``python -m gpuscout.agent``) through
the real bootstrap script; the bootstrap tests run the rendered script with
stand-in interpreters, to see exactly what it hands the agent and how it
installs gpuscout when no Python has it. Every fixture terminates what it
started, and each test checks in /proc that nothing of its instances is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gpuscout.agent import protocol
from gpuscout.domain import Offer
from gpuscout.market.catalog import default_local_catalog
from gpuscout.providers import (
    CapacityError,
    InstanceNotFound,
    LaunchError,
    LaunchRequest,
    LocalProvider,
    Provider,
    ProviderState,
    render_bootstrap,
)
from gpuscout.providers.bootstrap import MAX_USER_DATA_BYTES
from gpuscout.providers.local import MARKER_ENV

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")

# A command full of what a naive renderer breaks: both quote kinds, $, $(( )),
# ${...}, backticks, a backslash, newlines and a quoted here-document.
NASTY_COMMAND = (
    "printf '%s\\n' \"it's \\\"quoted\\\"\" 'single $HOME `id` \\n' > out.txt\n"
    'echo "$((6 * 7)) ${UNSET_VAR_X:-default} \\$literal '
    '${GPUSCOUT_API_TOKEN:-no-token}" >> out.txt\n'
    "cat >> out.txt <<'EOF'\nheredoc $HOME\nEOF"
)
NASTY_OUTPUT = (
    "it's \"quoted\"\nsingle $HOME `id` \\n\n42 default $literal no-token\nheredoc $HOME\n"
)


# --- helpers -------------------------------------------------------------------


def _offer() -> Offer:
    return default_local_catalog()[0]


def _request(command: str = "sleep 1000", **kw: object) -> LaunchRequest:
    fields: dict[str, object] = {
        "instance_id": f"i-{uuid.uuid4().hex[:10]}",
        "job_id": "j-1",
        "offer": _offer(),
        "command": command,
        "store_url": "file:///tmp/gpuscout-test-store",
    }
    fields.update(kw)
    return LaunchRequest(**fields)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _marked(marker: str) -> set[int]:
    """Live processes whose environment carries the instance's marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and _alive(int(entry)):
            found.add(int(entry))
    return found


def _kill_marked(marker: str) -> set[int]:
    """SIGKILL every live process carrying the instance's marker; the pids
    it found (empty: none was left)."""
    found = _marked(marker)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):  # it died meanwhile
            os.kill(pid, signal.SIGKILL)
    return found


def _health(address: str | None) -> dict[str, object] | None:
    """The agent's health, or None while nothing answers."""
    try:
        response = httpx.get(f"http://{address}/agent/health", timeout=1.0)
    except httpx.TransportError:
        return None
    response.raise_for_status()
    data: dict[str, object] = response.json()
    return data


def _wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.splitlines() if text.endswith("\n") else []


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def make_provider(root: Path) -> Iterator[Callable[..., LocalProvider]]:
    """LocalProviders on ``root``; afterwards every instance there is terminated
    and no process of any of them may be left."""

    def make(**kw: object) -> LocalProvider:
        kw.setdefault("terminate_grace_s", 3.0)
        return LocalProvider(root, **kw)  # type: ignore[arg-type]

    yield make
    cleaner = LocalProvider(root)
    instances = root / "instances"
    folders = sorted(instances.iterdir()) if instances.is_dir() else []
    for folder in folders:
        cleaner.terminate(folder.name)
    for folder in folders:
        leftover = _kill_marked(str(folder))  # never leave a process behind, even on failure
        assert not leftover, f"processes of {folder.name} outlived the test"


@pytest.fixture
def provider(make_provider: Callable[..., LocalProvider]) -> LocalProvider:
    return make_provider()


# --- the provider --------------------------------------------------------------


def test_is_a_provider_selling_the_local_catalog(provider: LocalProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.offers() == default_local_catalog()


def test_agent_is_unreachable_during_the_boot_delay_and_healthy_after(
    make_provider: Callable[..., LocalProvider],
) -> None:
    provider = make_provider(boot_delay_s=2.0)
    request = _request()
    started = time.monotonic()
    launched = provider.launch(request)

    assert launched.state == ProviderState.PENDING
    assert launched.address is not None and launched.address.startswith("127.0.0.1:")
    assert provider.get(request.instance_id).state == ProviderState.PENDING
    while time.monotonic() - started < 1.5:
        assert _health(launched.address) is None, "the agent answered during the boot delay"
        time.sleep(0.1)

    health = _wait_for(lambda: _health(launched.address), 20, "the agent's health")
    assert time.monotonic() - started >= 2.0
    assert isinstance(health, dict)
    assert health["instance_id"] == request.instance_id
    assert health["job_id"] == request.job_id
    assert provider.get(request.instance_id).state == ProviderState.RUNNING


def test_terminate_kills_every_process_of_the_tree(provider: LocalProvider) -> None:
    # The job starts a grandchild in the background and becomes another one.
    request = _request("sleep 1000 & echo $! > pids.txt; echo $$ >> pids.txt; exec sleep 1000")
    launched = provider.launch(request)
    folder = provider.instance_dir(request.instance_id)
    pids_file = folder / "work" / "pids.txt"
    _wait_for(lambda: len(_lines(pids_file)) == 2, 20, "the job's pids")
    job_pids = {int(line) for line in _lines(pids_file)}
    agent_pid = int(launched.provider_ref)
    everything = _marked(str(folder))
    assert job_pids | {agent_pid} <= everything
    assert all(_alive(pid) for pid in everything)

    provider.terminate(request.instance_id)

    assert not [pid for pid in everything if _alive(pid)]
    assert not _marked(str(folder))
    assert provider.get(request.instance_id).state == ProviderState.TERMINATED
    assert provider.list() == []
    provider.terminate(request.instance_id)  # twice is fine
    assert provider.get(request.instance_id).state == ProviderState.TERMINATED


def test_terminate_escalates_to_sigkill_for_a_job_that_ignores_sigterm(
    make_provider: Callable[..., LocalProvider],
) -> None:
    provider = make_provider(terminate_grace_s=0.5)
    # `trap '' TERM` is inherited: the sleeps ignore SIGTERM too.
    request = _request("trap '' TERM; sleep 1000 & echo $! > pids.txt; sleep 1000")
    provider.launch(request)
    folder = provider.instance_dir(request.instance_id)
    _wait_for(lambda: _lines(folder / "work" / "pids.txt"), 20, "the job's pids")
    everything = _marked(str(folder))

    started = time.monotonic()
    provider.terminate(request.instance_id)

    assert time.monotonic() - started < 5
    assert not [pid for pid in everything if _alive(pid)]
    assert provider.get(request.instance_id).state == ProviderState.TERMINATED


def test_state_is_on_disk_so_a_second_provider_sees_and_terminates(
    make_provider: Callable[..., LocalProvider],
) -> None:
    first = make_provider()
    other_cluster = make_provider(cluster="other")
    a, b, c = _request(), _request(), _request()
    first.launch(a)
    first.launch(b)
    other_cluster.launch(c)
    mine = {a.instance_id, b.instance_id}

    second = make_provider()  # e.g. the control plane after a restart
    assert {i.instance_id for i in first.list()} == mine
    assert {i.instance_id for i in second.list()} == mine
    assert [i.instance_id for i in other_cluster.list()] == [c.instance_id]
    seen = second.get(a.instance_id)
    assert (seen.job_id, seen.offer_id) == (a.job_id, a.offer.id)
    assert seen.state in (ProviderState.PENDING, ProviderState.RUNNING)

    second.terminate(a.instance_id)

    assert first.get(a.instance_id).state == ProviderState.TERMINATED
    assert not _marked(str(first.instance_dir(a.instance_id)))
    assert [i.instance_id for i in first.list()] == [b.instance_id]


def test_a_terminated_instance_folder_is_kept_a_while_then_removed(
    make_provider: Callable[..., LocalProvider],
) -> None:
    keeping = make_provider()  # one hour, as EC2 shows a terminated instance
    pruning = make_provider(keep_terminated_s=0.0)
    other_cluster = make_provider(cluster="other", keep_terminated_s=0.0)
    done, running, theirs = _request(), _request(), _request()
    for request in (done, running):
        keeping.launch(request)
    other_cluster.launch(theirs)
    keeping.terminate(done.instance_id)
    other_cluster.terminate(theirs.instance_id)
    folder = keeping.instance_dir(done.instance_id)

    assert [i.instance_id for i in keeping.list()] == [running.instance_id]
    assert folder.is_dir()  # logs and record still there within the hour
    assert keeping.get(done.instance_id).state == ProviderState.TERMINATED

    assert [i.instance_id for i in pruning.list()] == [running.instance_id]
    assert not folder.exists()
    with pytest.raises(InstanceNotFound):
        pruning.get(done.instance_id)
    keeping.terminate(done.instance_id)  # still idempotent once removed
    # A running instance, and another cluster's terminated one, are left alone.
    assert pruning.instance_dir(running.instance_id).is_dir()
    assert keeping.instance_dir(theirs.instance_id).is_dir()
    assert other_cluster.list() == []
    assert not keeping.instance_dir(theirs.instance_id).exists()


def test_an_instance_whose_processes_all_died_is_terminated(provider: LocalProvider) -> None:
    request = _request()
    launched = provider.launch(request)
    _wait_for(lambda: _health(launched.address), 20, "the agent's health")
    folder = provider.instance_dir(request.instance_id)

    # The machine crashes: every process of the instance is killed, again
    # while any is left (the agent may start its job's process between a
    # listing and the kills).
    _wait_for(lambda: not _kill_marked(str(folder)), 5, "every process of the instance to die")
    _wait_for(
        lambda: provider.get(request.instance_id).state == ProviderState.TERMINATED,
        5, "TERMINATED",
    )
    assert provider.list() == []


def test_a_reused_process_group_is_not_the_instances() -> None:
    """Pids are reused: a live group counts as the instance's only if its
    leader started when the recorded one did, or a member has the marker."""
    from dataclasses import replace

    from gpuscout.providers.local import _Record, _scan, _started_at

    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True,
                                env={"PATH": os.environ["PATH"]})
    marked = subprocess.Popen(["sleep", "30"], start_new_session=True,
                              env={"PATH": os.environ["PATH"], MARKER_ENV: "/i/1"})
    try:
        started = _started_at(stranger.pid)
        assert started is not None
        record = _Record(instance_id="i-1", job_id="j", offer_id="o", cluster="c",
                         host="127.0.0.1", port=1, launched_at=0.0, boot_delay_s=0.0,
                         pid=stranger.pid, pgid=stranger.pid, started_at=started,
                         marker="/i/1")
        assert _scan(record).group == {stranger.pid}  # the recorded leader
        reused = replace(record, started_at=started - 1.0)  # another process, same pid
        assert not _scan(reused)
        by_marker = replace(reused, pid=marked.pid, pgid=marked.pid)
        assert _scan(by_marker).group == {marked.pid}
        assert _scan(reused, hunt_escapees=True).escapees == {marked.pid}
    finally:
        for proc in (stranger, marked):
            proc.kill()
            proc.wait(5)
    assert not _scan(record, hunt_escapees=True)  # zombies reaped, nothing live


def test_unknown_ids_are_not_found_and_terminating_them_is_done(provider: LocalProvider) -> None:
    for unknown in ("i-never-launched", "../escape", ""):
        with pytest.raises(InstanceNotFound):
            provider.get(unknown)
        provider.terminate(unknown)
        with pytest.raises(InstanceNotFound):
            provider.notify_interruption(unknown)


def test_interruption_notice_is_reported_and_the_instance_keeps_running(
    provider: LocalProvider,
) -> None:
    request = _request()
    provider.launch(request)
    assert not provider.get(request.instance_id).interruption_notice
    provider.notify_interruption(request.instance_id)
    seen = provider.get(request.instance_id)
    assert seen.interruption_notice
    assert seen.state != ProviderState.TERMINATED
    assert LocalProvider(provider.root).list()[0].interruption_notice


def test_launch_refusals(provider: LocalProvider) -> None:
    request = _request()
    provider.launch(request)
    with pytest.raises(LaunchError):
        provider.launch(request)  # the id is taken
    with pytest.raises(LaunchError):
        provider.launch(_request(instance_id="../../etc"))
    refused = _request(offer=_offer().with_(available=False))
    with pytest.raises(CapacityError):
        provider.launch(refused)
    with pytest.raises(InstanceNotFound):
        provider.get(refused.instance_id)


def test_instances_get_distinct_ports_and_their_files(provider: LocalProvider) -> None:
    launched = [provider.launch(_request()) for _ in range(3)]
    assert len({i.address for i in launched}) == 3
    folder = provider.instance_dir(launched[0].instance_id)
    assert stat.S_IMODE((folder / "bootstrap.sh").stat().st_mode) == 0o600  # holds the token
    assert (folder / "instance.json").is_file()


def test_agent_ports_lie_below_the_ephemeral_range(provider: LocalProvider) -> None:
    """The agent binds its port after the boot delay: one from the range the
    kernel gives outgoing connections could be taken meanwhile (a boot that
    failed with "Address already in use" under load)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    launched = [provider.launch(_request()) for _ in range(3)]
    ports = [int(i.address.rsplit(":", 1)[1]) for i in launched]
    assert all(20000 <= port < low for port in ports), ports


def test_the_command_runs_byte_for_byte_and_sees_no_control_plane_secrets(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSCOUT_API_TOKEN", "control-plane-secret")
    request = _request(NASTY_COMMAND)
    provider.launch(request)
    out = provider.instance_dir(request.instance_id) / "work" / "out.txt"
    _wait_for(lambda: len(_lines(out)) == 4, 20, "the command's output")
    assert out.read_text() == NASTY_OUTPUT


def test_a_given_workdir_is_where_the_command_runs(
    provider: LocalProvider, tmp_path: Path
) -> None:
    workdir = tmp_path / "work dir with spaces"
    request = _request("pwd > where.txt", workdir=str(workdir))
    provider.launch(request)
    _wait_for(lambda: _lines(workdir / "where.txt"), 20, "the command's output")
    assert _lines(workdir / "where.txt") == [str(workdir)]
    assert (provider.instance_dir(request.instance_id) / "agent.log").is_file()


# --- the bootstrap script alone ------------------------------------------------

# Stands in for a Python that has gpuscout: answers the import probe, and as
# "the agent" records what it was given.
_AGENT_SHIM = """#!/bin/bash
case "$1" in
  -c) exit 0 ;;
  -m) [ "$2" = gpuscout.agent ] || exit 3
      env -0 > "$GPUSCOUT_INSTANCE_DIR/agent-env"
      pwd > "$GPUSCOUT_INSTANCE_DIR/agent-cwd"
      echo "$0" > "$GPUSCOUT_INSTANCE_DIR/agent-python"
      exit 0 ;;
esac
exit 4
"""
# A python3 without gpuscout that makes venvs whose python pip-installs.
_BARE_PYTHON3 = """#!/bin/bash
case "$1" in
  -c) exit 1 ;;
  -m) [ "$2" = venv ] || exit 3; mkdir -p "$3/bin"; cp "{venv_python}" "$3/bin/python"; exit 0 ;;
esac
exit 4
"""
_VENV_PYTHON = """#!/bin/bash
here="$(dirname "$0")"
case "$1" in
  -c) [ -f "$here/installed" ]; exit ;;
  -m) case "$2" in
        pip) last="${@: -1}"
             [ "$last" = pip ] || printf '%s' "$last" > "$here/installed"; exit 0 ;;
        gpuscout.agent) env -0 > "$GPUSCOUT_INSTANCE_DIR/agent-env"
                        echo "$0" > "$GPUSCOUT_INSTANCE_DIR/agent-python"; exit 0 ;;
      esac ;;
esac
exit 4
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run_script(
    script: str, tmp_path: Path, path_env: str, **env: str
) -> subprocess.CompletedProcess[str]:
    file = tmp_path / "user-data.sh"
    file.write_text(script)
    return subprocess.run(
        ["bash", str(file)], cwd="/", capture_output=True, text=True, timeout=30,
        env={"PATH": path_env, "HOME": str(tmp_path / "home"), **env},
    )


def _agent_env(instance_dir: Path) -> dict[str, str]:
    pairs = (instance_dir / "agent-env").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if p)


def test_bootstrap_hands_the_agent_every_variable_exactly(tmp_path: Path) -> None:
    shim = _executable(tmp_path / "bin" / "python-with-gpuscout", _AGENT_SHIM)
    instance_dir, workdir = tmp_path / "instance", tmp_path / "work"
    request = _request(
        NASTY_COMMAND, standby=True, workdir=str(workdir), control_url="http://cp:8080",
        agent_token="tok'en$", env={"EXTRA": "a 'b' \"c\" $d\nline two"},
    )
    script = render_bootstrap(
        request, agent_host="0.0.0.0", agent_port=8123, python=str(shim),
        instance_dir=str(instance_dir),
    )

    done = _run_script(script, tmp_path, "/usr/bin:/bin")

    assert done.returncode == 0, done.stdout + done.stderr
    env = _agent_env(instance_dir)
    assert env[protocol.ENV_COMMAND] == NASTY_COMMAND
    assert env["EXTRA"] == "a 'b' \"c\" $d\nline two"
    assert env[protocol.ENV_AGENT_TOKEN] == "tok'en$"
    assert (env[protocol.ENV_INSTANCE_ID], env[protocol.ENV_JOB_ID]) == (request.instance_id, "j-1")
    assert (env[protocol.ENV_AGENT_HOST], env[protocol.ENV_AGENT_PORT]) == ("0.0.0.0", "8123")
    assert env[protocol.ENV_STORE_URL] == request.store_url
    assert env[protocol.ENV_STANDBY] == "1"
    assert env[protocol.ENV_CONTROL_URL] == "http://cp:8080"
    assert env[protocol.ENV_WORKDIR] == str(workdir)
    assert (instance_dir / "agent-cwd").read_text().strip() == str(workdir)
    assert (instance_dir / "agent-python").read_text().strip() == str(shim)
    assert "starting the agent" in (instance_dir / "agent.log").read_text()


def test_bootstrap_unsets_what_is_not_given_and_works_in_the_instance_dir(
    tmp_path: Path,
) -> None:
    shim = _executable(tmp_path / "bin" / "python3", _AGENT_SHIM)
    instance_dir = tmp_path / "instance"
    script = render_bootstrap(
        _request(), agent_host="127.0.0.1", agent_port=1, instance_dir=str(instance_dir)
    )
    # A leftover in the machine's environment must not reach the agent.
    done = _run_script(
        script, tmp_path, f"{shim.parent}:/usr/bin:/bin", GPUSCOUT_CONTROL_URL="http://stale"
    )

    assert done.returncode == 0, done.stdout + done.stderr
    env = _agent_env(instance_dir)
    assert protocol.ENV_CONTROL_URL not in env
    assert env[protocol.ENV_STANDBY] == "0"
    assert env[protocol.ENV_WORKDIR] == str(instance_dir / "work")
    # No python given: python3 from PATH, since it has gpuscout.
    assert (instance_dir / "agent-python").read_text().strip() == str(shim)


def test_bootstrap_installs_the_package_into_a_venv_when_no_python_has_it(
    tmp_path: Path,
) -> None:
    venv_python = _executable(tmp_path / "shims" / "venv-python", _VENV_PYTHON)
    bare = _executable(
        tmp_path / "bin" / "python3", _BARE_PYTHON3.replace("{venv_python}", str(venv_python))
    )
    instance_dir = tmp_path / "instance"
    spec = "gpuscout[aws] @ https://example.com/gpuscout-0.1.0-py3-none-any.whl"
    script = render_bootstrap(
        _request(), agent_host="0.0.0.0", agent_port=1, python="/nonexistent/python",
        package_spec=spec, instance_dir=str(instance_dir),
    )

    done = _run_script(script, tmp_path, f"{bare.parent}:/usr/bin:/bin")

    assert done.returncode == 0, done.stdout + done.stderr
    venv = instance_dir / "venv" / "bin"
    assert (venv / "installed").read_text() == spec
    assert (instance_dir / "agent-python").read_text().strip() == str(venv / "python")
    assert protocol.ENV_COMMAND in _agent_env(instance_dir)
    # The job's own `python` is the venv's, which has gpuscout.
    assert _agent_env(instance_dir)["PATH"].startswith(f"{venv}:")


def test_bootstrap_fails_clearly_without_gpuscout_or_a_package_spec(tmp_path: Path) -> None:
    venv_python = _executable(tmp_path / "shims" / "venv-python", _VENV_PYTHON)
    bare = _executable(
        tmp_path / "bin" / "python3", _BARE_PYTHON3.replace("{venv_python}", str(venv_python))
    )
    instance_dir = tmp_path / "instance"
    script = render_bootstrap(
        _request(), agent_host="0.0.0.0", agent_port=1, instance_dir=str(instance_dir)
    )

    done = _run_script(script, tmp_path, f"{bare.parent}:/usr/bin:/bin")

    assert done.returncode != 0
    assert "GPUSCOUT_PACKAGE_SPEC is empty" in (instance_dir / "agent.log").read_text()


def test_bootstrap_fits_ec2_user_data_and_refuses_what_does_not() -> None:
    script = render_bootstrap(
        _request(NASTY_COMMAND), agent_host="0.0.0.0", agent_port=8000,
        package_spec="gpuscout==0.1.0",
    )
    assert script.startswith("#!/bin/bash\n")
    assert len(script.encode()) < MAX_USER_DATA_BYTES
    with pytest.raises(ValueError, match="16384-byte"):
        render_bootstrap(_request("x" * MAX_USER_DATA_BYTES), agent_host="h", agent_port=1)


def test_bootstrap_refuses_bad_extra_environment() -> None:
    with pytest.raises(ValueError, match=protocol.ENV_JOB_ID):
        render_bootstrap(_request(env={protocol.ENV_JOB_ID: "x"}), agent_host="h", agent_port=1)
    with pytest.raises(ValueError, match="shell variable"):
        render_bootstrap(_request(env={"NOT-A-NAME": "x"}), agent_host="h", agent_port=1)
