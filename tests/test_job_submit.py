"""`ray job submit` against a local head that this test starts (token auth, loopback dashboard, free
ports, its own temp dir and HOME) and stops (only its own processes, never `ray stop`)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_ray_jobs import ROOT, assets, write_space  # noqa: F401  (module fixture)

pytest.importorskip("ray")
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    temp = tempfile.mkdtemp(prefix="/tmp/ctj")  # Ray's socket paths must stay short
    gcs, dash, client, agent, metrics, runtime_env, node_mgr, obj_mgr = free_ports(8)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": temp, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", "--min-worker-port=20000",
           "--max-worker-port=20999", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except Exception as e:  # 401 once up with token auth
            if getattr(e, "code", None) == 401:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
    else:
        pytest.fail("local head did not come up")
    yield {"address": address, "env": env}
    os.killpg(proc.pid, signal.SIGTERM)  # only the processes of the head this test started
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class TestJobSubmit:
    def test_submit_tune_job_and_follow_it(self, head, assets, tmp_path):  # noqa: F811
        space = write_space(tmp_path / "job.yaml", assets, trials=2, max_steps=2, eval_steps=1)
        storage = tmp_path / "experiments"
        submit = [RAY, "job", "submit", "--address", head["address"], "--working-dir", str(ROOT), "--no-wait",
                  "--submission-id", f"conftok-test-{os.getpid()}", "--", "python", "-m", "ray_jobs.tune",
                  "--space", str(space), "--storage_path", str(storage)]
        out = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        job_id = f"conftok-test-{os.getpid()}"
        status = ""
        deadline = time.time() + 420
        while time.time() < deadline:
            res = subprocess.run([RAY, "job", "status", "--address", head["address"], job_id], env=head["env"],
                                 capture_output=True, text=True, timeout=60)
            status = res.stdout + res.stderr
            if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
                break
            time.sleep(3)
        logs = subprocess.run([RAY, "job", "logs", "--address", head["address"], job_id], env=head["env"],
                              capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"succeeded", status, re.IGNORECASE), status + logs[-4000:]
        assert "Best trial" in logs and "Results:" in logs
        results = json.loads((storage / "job" / "results.json").read_text())
        assert len(results["trials"]) == 2

    def test_without_the_token_the_head_refuses(self, head):
        # The head itself: its job API answers 401 to a request without the token.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{head['address']}/api/jobs/", timeout=10)
        assert e.value.code == 401
        # The CLI: with the token it lists the jobs; without one (another HOME) it stops and says why.
        listed = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=head["env"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        env = {**head["env"], "HOME": tempfile.mkdtemp()}  # no ~/.ray/auth_token here
        res = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode != 0 and "token" in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
