"""A real Flower federation on 127.0.0.1 for the tests: a SuperLink and SuperNodes as
separate processes (own sessions, stopped by PID), free ports, a temporary FLWR_HOME, small
CT sites on disk. Not a pytest module: imported by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrecon.datasets import CTAcquisition, DataSource, SiteSpec, write_phantom_volumes

from fedrecon.runners.flower_cli import (
    TLSFiles,
    flower_env,
    register_node_command,
    run_command,
    site_command,
    superlink_command,
    supernode_command,
    wait_for_status,
    write_connection,
)
from fedrecon.runners.site_config import SiteConfig, SiteRuntime, site_config_to_toml

SIZE = 16
VIEWS = (8, 12)

#: The run of every test: 2 sites, 2 rounds of FedAvg on a tiny unrolled network.
RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 2, "modality": "ct", "seed": 0, "min-sites": 2, "expected-sites": 2,
    "eval-every": 2, "round-timeout": 120.0, "connect-timeout": 60.0,
    "strategy.name": "fedavg", "strategy.local-steps": 2, "strategy.lr": 1e-3,
    "model.n-iter": 2, "model.chans": 4, "model.num-pools": 1,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def write_ct_site(root: Path, k: int) -> SiteConfig:
    """Site ``ct<k>``: two phantom volumes (train, val) of 2 slices, its own view count."""
    data = root / f"ct{k}" / "data"
    write_phantom_volumes(data, n_volumes=2, n_slices=2, image_size=SIZE, seed=10 + k,
                          overwrite=True)
    spacing = 400.0 / SIZE
    acq = CTAcquisition(geometry="parallel", n_views=VIEWS[k % len(VIEWS)],
                        image_size=(SIZE, SIZE), pixel_spacing=spacing, det_spacing=spacing,
                        photons=1e5)
    spec = SiteSpec(f"ct{k}", "ct", DataSource(kind="folder", path=str(data)), acq,
                    (0.5, 0.5, 0.0))
    return SiteConfig(spec, SiteRuntime(state_dir=str(root / f"ct{k}" / "state"), seed=0,
                                        torch_threads=1))


def ct_node_context(root: Path, k: int = 0) -> tuple[Any, SiteConfig]:
    """A ClientApp ``Context`` on node 1 for site ``ct<k>`` (``write_ct_site`` under ``root``,
    its site config as TOML), with ``RUN_CONFIG`` and a run folder; and the site config."""
    from flwr.app import Context, RecordDict

    cfg = write_ct_site(root, k)
    toml = root / f"ct{k}.toml"
    toml.write_text(site_config_to_toml(cfg))
    return Context(1, 1, {"site-config": str(toml)}, RecordDict(),
                   {**RUN_CONFIG, "run-dir": str(root / "run")}), cfg


@dataclass
class Federation:
    """Processes of one federation; :meth:`stop` kills every process group it started."""

    root: Path
    tls: TLSFiles | None = None
    supernode_auth: bool = False
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = self.root / "flwr_home"
        self.env = flower_env(self.home, torch_threads=1)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        write_connection(self.home, f"127.0.0.1:{self.port}",
                         root_certificates=self.tls.ca_cert if self.tls else None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        proc = self._start("superlink", superlink_command(
            port=self.port, tls=self.tls, supernode_auth=self.supernode_auth))
        wait_for_port(self.port, 60.0, proc)

    def start_site(self, name: str, site_toml: Path, auth_key: Path | None = None, *,
                   launcher: bool = False) -> None:
        """The site's SuperNode; ``launcher``: through ``fedrecon flower-site``, which starts
        it again while the SuperLink refuses to activate it (a restart after a kill)."""
        make = site_command if launcher else supernode_command
        self._start(name, make(
            superlink=self.address, site_config=site_toml, port=free_port(),
            root_certificates=self.tls.ca_cert if self.tls else None, auth_key=auth_key))

    def flwr(self, cmd: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        return self.flwr(register_node_command(public_key))

    def run(self, run_dir: Path, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        started = time.time()
        res = self.flwr(run_command({**config, "run-dir": str(run_dir)}))
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{res.stdout}\n{res.stderr}")
        return wait_for_status(run_dir, timeout, since=started)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process group that the process ``name`` leads (by its PID), then
        SIGKILL what is left of it."""
        proc = self.procs.pop(name)
        for s in (sig, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, s)
            try:
                proc.wait(15)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM every process group at once (graceful shutdowns overlap), then
        :meth:`kill` each: what did not exit gets SIGKILL."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def log_tail(self, n: int = 40) -> str:
        out = []
        for p in sorted(self.logs.glob("*.log")):
            lines = p.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)


@contextlib.contextmanager
def federation(root: Path, n_sites: int = 2, **kw: Any) -> Iterator[tuple[Federation, list[SiteConfig]]]:
    """A SuperLink and ``n_sites`` SuperNodes, all stopped on exit."""
    fed = Federation(root, **kw)
    sites = []
    try:
        fed.start_superlink()
        for k in range(n_sites):
            cfg = write_ct_site(root, k)
            path = root / f"ct{k}.toml"
            path.write_text(site_config_to_toml(cfg), encoding="utf-8")
            sites.append(cfg)
            fed.start_site(cfg.name, path)
        yield fed, sites
    finally:
        fed.stop()
