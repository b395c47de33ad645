"""A local run's Ray instance is its own and leaves nothing behind."""

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LOCAL_RUN = textwrap.dedent("""
    import os, ray, ray.util.state
    from tokdist_ray.raycluster import connect
    connect()
    session = ray._private.worker._global_node.get_session_dir_path()
    worker_tmp = ray.get(ray.remote(lambda: os.environ["TMPDIR"]).remote())
    # the state API inside a worker (Ray Train's placement-group cleaner uses it) finds this
    # instance although another one runs on the machine
    actors = ray.get(ray.remote(lambda: len(ray.util.state.list_actors(raise_on_missing_output=False))).remote())
    assert "RAY_API_SERVER_ADDRESS" not in os.environ and actors >= 0
    print(session, worker_tmp, sep="\\n")
""")


def test_a_local_instance_is_its_own_and_is_removed_at_exit(ray_head):
    # a short temp dir, so that the run keeps its instance under it (see raycluster._short_temp_dir)
    tmp_path = Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", LOCAL_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    session, worker_tmp = done.stdout.split()[-2:]
    # started in a folder of this run's own, never joined to a cluster found on the host
    assert session.startswith(str(tmp_path / "tokdist-ray-")) and worker_tmp.startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == [], "the session folder and the workers' temp files must be removed"
    tmp_path.rmdir()
