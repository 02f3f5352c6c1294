"""The processes of a federated run on Flower's deployment engine, on this machine over loopback: one SuperLink,
one SuperNode per client, and the run submitted with `flwr run`; then watched until it finishes.

If the SuperLink dies, a new one is started on the same port (the SuperNodes reconnect to it) and the run is
submitted again: a restarted SuperLink marks the old run failed, and the ServerApp resumes from its last round
checkpoint. A SuperNode that dies is left dead: the round completes with the others.

Across machines the same commands apply, with the SuperLink's --host on a reachable address, TLS instead of
--insecure, and each SuperNode's --superlink pointing at it (docs/federated.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...errors import ConfigError
from ...fsio import atomic_write_text
from .checkpoints import read_log
from .plan import EXPECTED_CLIENTS, SERVER_ERROR

CONNECTION = "pocketlm"
APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pocketlm-federated"
version = "1.0.0"
description = "pocketlm federated training: the ServerApp and ClientApp live in the installed pocketlm package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pocketlm"

[tool.flwr.app.components]
serverapp = "pocketlm.train.federated.server_app:app"
clientapp = "pocketlm.train.federated.client_app:app"

[tool.flwr.app.config]
work-dir = {work_dir}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """The children's environment: this interpreter's bin/ first on PATH (Flower starts flwr-serverapp and
    flwr-clientapp from it), its own FLWR_HOME, no telemetry or update checks."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    return env


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ConfigError(f"{name} not found beside {sys.executable}: install Flower into this environment "
                          "(pip install -e . installs flwr)")
    return str(path)


@dataclass
class Federation:
    """The SuperLink and SuperNodes of one run, their ports and logs under WORK/flower."""

    work: Path
    clients: int
    superlink_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.dir = self.work / "flower"
        self.home = self.dir / "home"
        self.app_dir = self.dir / "app"
        self.env = flower_env(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.app_dir.mkdir(parents=True, exist_ok=True)
        (self.app_dir / "pyproject.toml").write_text(
            APP_PYPROJECT.replace("{work_dir}", json.dumps(str(self.work.resolve()))))
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n')

    # ---- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        # a session of its own: a Ctrl-C at the terminal reaches `federate`, which stops them in order (stop())
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir,
                                   start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def start_superlink(self) -> None:
        self._spawn("superlink", [_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.superlink_port), "--disable-runtime-dependency-installation"])
        self._wait_for_port(self.superlink_port, "superlink")

    def start_supernode(self, client: int) -> None:
        self._spawn(f"supernode-{client}", [
            _tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--port", str(free_port()), "--node-config", f"partition-id={client} num-partitions={self.clients}"])

    def start(self) -> None:
        self.start_superlink()
        for client in range(self.clients):
            self.start_supernode(client)

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop a process and every process it started (Flower starts its SuperExec, ServerApp and ClientApps in
        sessions of their own, so its process group is not enough); tests kill a SuperNode or the SuperLink."""
        process = self.processes[name]
        _signal_tree(process.pid, sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_tree(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for name in self.processes:
            self.kill(name, signal.SIGTERM)

    def _wait_for_port(self, port: int, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(name):
                raise ConfigError(f"federated: the {name} exited at start ({self.tail(name)})")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise ConfigError(f"federated: the {name} did not open port {port} in {timeout:.0f} s (log: "
                          f"{self.dir / (name + '.log')})")

    def tail(self, name: str, lines: int = 3) -> str:
        path = self.dir / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " | ".join(text[-lines:]) or "no output"

    # ---- the run ---------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> dict:
        """A `flwr` command with --format json, its output parsed."""
        done = subprocess.run([_tool("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                              env=self.env, cwd=self.dir, timeout=timeout)
        try:
            return json.loads(done.stdout[done.stdout.find("{"):])
        except json.JSONDecodeError:
            raise ConfigError(f"federated: `flwr {args[0]}` gave no JSON ({(done.stdout + done.stderr).strip()[-300:]})"
                              ) from None

    def submit(self) -> int:
        # how many SuperNodes the ServerApp waits for before its first round: the live ones (a resubmitted run
        # must not wait for a client that died before)
        live = sum(self.alive(f"supernode-{c}") for c in range(self.clients))
        atomic_write_text(self.dir / EXPECTED_CLIENTS, str(live))
        reply = self.flwr("run", str(self.app_dir), CONNECTION)
        if not reply.get("success") or reply.get("run-id") is None:
            raise ConfigError(f"federated: `flwr run` did not start the run ({reply})")
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> tuple[str, dict]:
        reply = self.flwr("ls", "--run-id", str(run_id), CONNECTION)
        runs = reply.get("runs") or []
        return (runs[0]["status"], runs[0]) if runs else ("unknown", {})


@dataclass
class Watcher:
    """Watches a submitted run: reports each finished round, restarts a dead SuperLink and resubmits, and returns
    when the run has finished, with its traffic as Flower counted it (per submission)."""

    federation: Federation
    rounds: int
    on_round: Callable[[dict], None] = lambda record: None
    poll_s: float = 2.0
    status_every_s: float = 30.0  # `flwr ls` is a process of its own: seconds of CPU a call
    submissions: list[dict] = field(default_factory=list)
    restarts: int = 0
    resubmits: int = 0  # runs Flower failed on its own and that were submitted again
    max_resubmits: int = 2

    def run(self) -> list[dict]:
        fed = self.federation
        run_id = fed.submit()
        reported = len(read_log(fed.work))
        last_status = time.monotonic()
        while True:
            time.sleep(self.poll_s)
            log = read_log(fed.work)
            for record in log[reported:]:
                self.on_round(record)
            reported = len(log)
            if not fed.alive("superlink"):
                run_id = self._restart(run_id)
                last_status = time.monotonic()
                continue
            if reported >= self.rounds or time.monotonic() - last_status > self.status_every_s:
                last_status = time.monotonic()
                status, row = fed.run_status(run_id)
                if status.startswith("finished"):
                    # the ServerApp may have logged its last round between the read above and this status
                    log = read_log(fed.work)
                    for record in log[reported:]:
                        self.on_round(record)
                    reported = len(log)
                    self.submissions.append({"run_id": run_id, "status": status, **_traffic(row)})
                    if status == "finished:failed" and not (fed.dir / SERVER_ERROR).exists() \
                            and self.resubmits < self.max_resubmits:
                        # Flower failed the run, not the ServerApp (a missed heartbeat): again, from the checkpoint
                        self.resubmits += 1
                        run_id = fed.submit()
                        continue
                    if status != "finished:completed" or reported < self.rounds:
                        error = fed.dir / SERVER_ERROR
                        why = (error.read_text().strip() if error.is_file() else row.get("status-details")
                               ) or f"logs in {fed.dir}"
                        raise ConfigError(f"federated: run {run_id} ended {status} after {reported} of {self.rounds} "
                                          f"rounds: {why}")
                    return self.submissions

    def _restart(self, run_id: int) -> int:
        """A new SuperLink on the same port, and the run submitted again. A restarted SuperLink knows none of the
        SuperNodes, and Flower 1.42's SuperNodes exit when it refuses them: the live ones are restarted with it
        (a client that had died before stays dead)."""
        fed = self.federation
        self.submissions.append({"run_id": run_id, "status": "superlink died"})
        self.restarts += 1
        fed.kill("superlink")  # whatever it started (its SuperExec and ServerApp) goes with it
        live = [c for c in range(fed.clients) if fed.alive(f"supernode-{c}")]
        for client in live:
            fed.kill(f"supernode-{client}", signal.SIGTERM)
        fed.start_superlink()
        for client in live:
            fed.start_supernode(client)
        return fed.submit()


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants, children first found, then the process itself."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family[:-1], timeout=15 if sig != signal.SIGKILL else 5)


def _traffic(row: dict) -> dict:
    traffic = row.get("network-traffic") or {}
    return {"inbound_bytes": traffic.get("inbound-bytes"), "outbound_bytes": traffic.get("outbound-bytes")}


def clear_flower_state(work: Path) -> None:
    """A fresh FLWR_HOME and logs for a new run in WORK."""
    shutil.rmtree(work / "flower", ignore_errors=True)
