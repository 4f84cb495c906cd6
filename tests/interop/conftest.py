"""Fixtures for the interop tests: the spiffe-tunnel binary and a dev agent
serving the Workload API on a private socket, as a real process."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def binary() -> str:
    path = os.environ.get("SPIFFE_TUNNEL_BIN", str(REPO / "target" / "debug" / "spiffe-tunnel"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (scripts/test does)")
    return path


class DevAgent:
    def __init__(self, args):
        self.dir = tempfile.mkdtemp(prefix="st-interop-")
        self.socket = os.path.join(self.dir, "api.sock")
        self.log = open(os.path.join(self.dir, "agent.log"), "w+")
        self.proc = subprocess.Popen(
            [binary(), "dev-agent", "--socket", self.socket, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dev agent did not start:\n{self.logs()}")
            time.sleep(0.02)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def logs(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def dev_agent():
    """Factory: dev_agent(*extra_args) -> DevAgent, stopped after the test."""
    agents = []

    def start(*args):
        agent = DevAgent(list(args))
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
