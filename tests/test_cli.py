"""`hub serve` as a user starts it: flags, HUB_* variables, clear errors.

Every flag against the README's table, its variable and --help: test_contract.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import API_KEY, HubProcess, http, run_hub


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["serve", "--port", "abc"], {}, "port"),
        (["serve", "--port", "70000"], {}, "port"),
        (["serve", "--bogus"], {}, "--bogus"),
        (["serve", "--grace", "-1"], {}, "grace"),
        (["serve", "--rate-limit", "-1"], {}, "rate-limit must be >= 0 (0 = off)"),
        (["serve", "--touch-window", "-1"], {}, "touch-window must be >= 0 (0 = within the publish window)"),
        (["serve", "--log-format", "xml"], {}, "log-format"),
        (["serve", "--workers", "2"], {}, "redis"),
        (["serve", "--projects", "bad key!"], {}, "projects"),
        (["serve", "--redis-url", "http://x"], {}, "redis"),
        (["serve", "--cors-origins", "dash.example"], {}, "cors-origins"),
        (["serve"], {"HUB_CORS_ORIGINS": "https://x/path"}, "HUB_CORS_ORIGINS"),
        (["serve"], {"HUB_PORT": "nope"}, "HUB_PORT"),
        (["serve"], {"HUB_LOG_LEVEL": "loud"}, "log-level"),
        ([], {}, "command"),
    ],
)
def test_bad_flag_or_value_is_one_line_and_exit_2(args: list[str], env: dict[str, str], words: str) -> None:
    result = run_hub(*args, env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert words.lower() in lines[0].lower()


async def test_environment_configures_the_hub_and_a_flag_wins() -> None:
    env = {"HUB_PORT": "1", "HUB_API_KEY": API_KEY, "HUB_PROJECTS": "shop:42"}
    with HubProcess(env=env) as proc:  # --port 0 is passed as a flag: it wins over HUB_PORT
        proc.wait_ready()
        reply = await http(proc.port, "GET", "/public/shop/assist/sessions")
        assert reply.status == 200
        reply = await http(proc.port, "GET", "/public/other/assist/sessions")
        assert reply.status == 404
        assert proc.terminate() == 0


async def test_generated_api_key_is_printed_once_and_works() -> None:
    with HubProcess() as proc:
        proc.wait_ready()
        assert proc.terminate() == 0
        out = proc.proc.stdout.read()  # type: ignore[union-attr]
        err = proc.stderr.text()
    lines = [line for line in out.splitlines() if "API key" in line]
    assert len(lines) == 1, out
    key = lines[0].rsplit(" ", 1)[1]
    assert len(key) >= 24 and key not in err, "printed once, never logged"
    with HubProcess("--api-key", key) as proc:
        proc.wait_ready()
        assert (await http(proc.port, "GET", "/public/p/assist/sessions", key=key)).status == 200


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "hub"
    assert script.exists() or shutil.which("hub"), "pip install gives a `hub` console script"
    result = subprocess.run(
        [str(script) if script.exists() else "hub", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0 and "--redis-url" in result.stdout
