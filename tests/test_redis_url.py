"""A bad or unreachable --redis-url (issue 15, defect 7): one line, exit 2, no secret in any line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import run_hub

SECRET = "s3cr3t-pw"


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_hub("serve", "--port", "0", "--api-key", "k", *args, env=env)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:notaport",
        f"redis://:{SECRET}@127.0.0.1:99999",
        f"http://:{SECRET}@127.0.0.1:6379",
        f"redis://user:{SECRET}@127.0.0.1:6379/0?socket_timeout=soon",
        "redis://",
    ],
)
@pytest.mark.parametrize("via", ["flag", "env"])
def test_a_bad_redis_url_is_one_line_exit_2_without_the_password(url: str, via: str) -> None:
    result = serve("--redis-url", url) if via == "flag" else serve(env={"HUB_REDIS_URL": url})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis" in lines[0], lines
    assert SECRET not in result.stderr + result.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_an_unreachable_redis_is_logged_once_per_interval_without_traceback_or_password(scheme: str) -> None:
    # Nothing listens there: every connection attempt is refused at once, so the
    # hub retries every 0.1-2 s; the log must not grow with the retries.
    url = f"{scheme}://:{SECRET}@127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", "--port", "0", "--api-key", "k", "--redis-url", url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    down = [line for line in err.splitlines() if "cluster.redis_down" in line]
    assert len(down) == 1, err
    assert "Traceback" not in err and "cluster.failed" not in err, err
    assert SECRET not in err + out
