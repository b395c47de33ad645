"""A local run's Ray instance is its own, listens on localhost only, holds none of Ray's fixed
ports, and leaves nothing behind: at exit, on SIGTERM, or when it fails to start."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import tiny_job_args
from tokdist_ray.raycluster import KEEP_LOGS, _private_token

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Ray's fixed default ports: GCS, dashboard, client server, dashboard agent, autoscaler and dashboard metrics
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 44217, 44227}
RESUME_LINE = ("tokdist-ray: interrupted. Run the same command again to continue: finished stages are reused "
               "and distillation resumes from its last checkpoint.")

LOCAL_RUN = textwrap.dedent("""
    import json, os, pathlib, psutil, ray, ray.util.state
    from tokdist_ray.raycluster import connect
    connect()
    node = ray._private.worker._global_node
    worker_tmp = ray.get(ray.remote(lambda: os.environ["TMPDIR"]).remote())
    # the state API inside a worker (Ray Train's placement-group cleaner uses it) finds this
    # instance, with its actors, although another one runs on the machine
    marker = ray.remote(type("Marker", (), {})).options(name="tokdist-marker").remote()
    ray.get(marker.__ray_ready__.remote())
    names = ray.get(ray.remote(lambda: [a.name for a in ray.util.state.list_actors(raise_on_missing_output=False)])
                    .remote())
    assert "RAY_API_SERVER_ADDRESS" not in os.environ and "tokdist-marker" in names, names
    me = psutil.Process()  # every process of the instance descends from this one
    listening = [[c.laddr.ip, c.laddr.port] for p in [me, *me.children(recursive=True)]
                 for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    token = pathlib.Path.home() / ".ray" / "auth_token"
    print(json.dumps({"session": node.get_session_dir_path(), "worker_tmp": worker_tmp, "listening": listening,
                      "agent_ports": [node.dashboard_agent_listen_port, node.metrics_export_port],
                      "token_mode": oct(token.stat().st_mode & 0o777)}))
""")

FAILED_START = textwrap.dedent("""
    import psutil, ray._private.node
    from tokdist_ray.errors import RayStartError
    from tokdist_ray.raycluster import connect

    def timed_out(node):  # Ray's own error when the raylet does not come up in time
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    ray._private.node.Node.start_ray_processes = timed_out  # ray.init has started the GCS and the dashboard
    try:
        connect()
    except RayStartError as e:
        print(len(psutil.Process().children(recursive=True)))
        print(e)
""")


def _short_tmp() -> Path:
    """A short temp dir, so that a run keeps its instance under it (see raycluster._short_temp_dir)."""
    return Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")} | extra
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_a_local_instance_is_its_own_and_is_removed_at_exit(ray_head):
    tmp_path, home = _short_tmp(), _short_tmp()  # a home without a token: the run writes one
    try:
        done = subprocess.run([sys.executable, "-c", LOCAL_RUN], env=_env(TMPDIR=str(tmp_path), HOME=str(home)),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout.splitlines()[-1])
        # started in a folder of this run's own, never joined to a cluster found on the host
        assert seen["session"].startswith(str(tmp_path / "tokdist-ray-")) and seen["worker_tmp"].startswith(str(tmp_path))
        assert list(tmp_path.iterdir()) == [], "the session folder and the workers' temp files must be removed"
        # localhost only, metrics endpoints included, and none of the ports a `ray start --head` beside it takes
        ports = {port for _, port in seen["listening"]}
        assert set(seen["agent_ports"]) <= ports, "the agent's HTTP and metrics ports should be among those listed"
        assert {ip for ip, _ in seen["listening"]} <= {"127.0.0.1", "::ffff:127.0.0.1"}, seen["listening"]
        assert not ports & RAY_DEFAULT_PORTS, seen["listening"]
        assert seen["token_mode"] == "0o600", "Ray writes its token readable by everyone"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_the_token_of_a_local_instance_is_readable_by_its_user_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a token Ray wrote")
    token.chmod(0o644)  # as Ray writes it
    _private_token()
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == "a token Ray wrote"

    token.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no authentication: no token to write
    _private_token()
    assert not token.exists()


@pytest.mark.parametrize("keep_logs", [False, True])
def test_a_local_instance_that_does_not_start_leaves_nothing_running_and_says_what_to_try(keep_logs):
    tmp_path = _short_tmp()
    try:
        env = _env(TMPDIR=str(tmp_path), **{KEEP_LOGS: "1"} if keep_logs else {})
        done = subprocess.run([sys.executable, "-c", FAILED_START], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        left_running, message = done.stdout.splitlines()[-2:]
        assert left_running == "0", "the GCS and the dashboard that did start must be stopped"
        assert message.startswith("the job's local Ray instance did not start (The current node timed out during startup.")
        assert "run the job again" in message and "RAY_ADDRESS" in message
        kept = list(tmp_path.iterdir())
        if keep_logs:
            assert len(kept) == 1 and message.endswith(f"its logs are in {kept[0]}")
            assert list(kept[0].glob("session_*/logs/gcs_server.out"))
        else:
            assert kept == [] and message.endswith(f"{KEEP_LOGS}=1 keeps its logs")
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_sigterm_stops_a_local_run_as_ctrl_c_does_and_the_same_command_continues(tiny_model_dir, job_corpus_dir):
    """`kill`, Kubernetes, systemd and `ray job stop` send SIGTERM; Ray's core used to answer it with
    a stack dump and exit 134, saying nothing of how to continue."""
    tmp_path = _short_tmp()
    try:
        run_dir = tmp_path / "run"  # given relative to the working dir, as the default runs/demo is
        command = [sys.executable, "-m", "tokdist_ray.job.cli", "distill",
                   *tiny_job_args(tiny_model_dir(tied=True), job_corpus_dir, "run")]
        env = _env(TMPDIR=str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        seen = []
        for line in job.stdout:
            seen.append(line)
            if "distributed distillation:" in line:  # Ray is up and Ray Train starts its workers
                job.send_signal(signal.SIGTERM)
                break
        out = "".join(seen) + job.communicate(timeout=300)[0]
        assert job.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert RESUME_LINE in out and "SIGTERM received" not in out and "Traceback" not in out, out[-3000:]
        assert list((tmp_path / "tmp").iterdir()) == [], "the local instance must be removed"

        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((run_dir / "job.json").read_text())["stages_reused"] == ["tokens", "snippets"]
        assert again.stdout.splitlines()[-1].endswith(f"outputs under {run_dir}"), "the path, not what was given"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
