"""Launch a fedrecon federation on Flower: commands for the SuperLink (the coordinator), the
SuperNodes (one per hospital), node registration and the run itself.

This module does not import ``flwr``: it builds command lines for Flower's own executables
(``flower-superlink``, ``flower-supernode``, ``flwr``) and the environment they run in, with
no network use beyond the federation: telemetry, update checks and runtime dependency
installation are off. :func:`register` adds the ``flower-*`` subcommands to fedrecon's CLI.

Ports: the SuperLink serves its Fleet, Control and Runtime APIs over HTTP(S) on one port;
every SuperNode serves a local Runtime API for its ClientApp processes on its own port.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["APP_DIR", "TLSFiles", "flower_env", "register", "register_node_command",
           "run_command", "run_supernode", "site_command", "superlink_command",
           "supernode_command", "toml_override", "wait_for_status", "write_connection"]

#: The shipped Flower App (pyproject with [tool.flwr.app]); ``flwr run`` builds it.
APP_DIR = Path(__file__).resolve().parent / "flower-app"
CONNECTION = "fedrecon"  # the name of the SuperLink connection fedrecon writes

#: Environment for every Flower process: nothing leaves the federation.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the federation's TLS (see ``scripts/make_certificates.py``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> TLSFiles:
        folder = Path(folder)
        files = cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
        for p in (files.ca_cert, files.server_cert, files.server_key):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing (generate the certificates with "
                                        f"scripts/make_certificates.py --out {folder})")
        return files


def _bin(name: str) -> str:
    """A Flower executable next to this Python's (the venv's ``bin``), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: str | os.PathLike | None = None,
               base: Mapping[str, str] | None = None, *,
               torch_threads: int | None = None) -> dict[str, str]:
    """The environment of a Flower process: offline switches, this venv's ``bin`` first on
    ``PATH`` (SuperLink and SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name), ``FLWR_HOME`` if given."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if torch_threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(torch_threads)
    return env


def superlink_command(*, port: int, host: str = "127.0.0.1", tls: TLSFiles | None = None,
                      supernode_auth: bool = False,
                      database: str | os.PathLike | None = None) -> list[str]:
    """``flower-superlink`` on ``host:port`` (TLS unless ``tls`` is None, then insecure)."""
    if supernode_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS: give the certificates")
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(*, superlink: str, site_config: str | os.PathLike, port: int,
                      root_certificates: str | os.PathLike | None = None,
                      auth_key: str | os.PathLike | None = None,
                      max_wait_time: float | None = None) -> list[str]:
    """``flower-supernode`` for one site: its site configuration file goes in the node
    config (it never leaves the machine); ``port`` is the node's local Runtime API."""
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", f'site-config="{Path(site_config).resolve()}"']
    cmd += (["--root-certificates", str(root_certificates)] if root_certificates is not None
            else ["--insecure"])
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def write_connection(flwr_home: str | os.PathLike, address: str, *,
                     root_certificates: str | os.PathLike | None = None,
                     name: str = CONNECTION) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one SuperLink connection, the default, that
    ``flwr run`` and ``flwr supernode register`` use."""
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toml_override(key: str, value: Any) -> str:
    """``key=value`` as ``flwr run -c`` reads it (the value in TOML)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (str, os.PathLike)):
        text = json.dumps(str(value))
    else:
        raise TypeError(f"run config '{key}': unsupported value {value!r}")
    return f"{key}={text}"


def run_command(run_config: Mapping[str, Any] | None = None, *,
                app_dir: str | os.PathLike = APP_DIR, connection: str = CONNECTION) -> list[str]:
    """``flwr run`` of the fedrecon app with run-config overrides (``{"run-dir": ...,
    "strategy.local-steps": 2}``)."""
    cmd = [_bin("flwr"), "run", str(app_dir), connection]
    if run_config:
        # one -c for all keys: flwr 1.42 parses each -c as its own TOML document and merges
        # them at the top level, so a second -c 'model.x=..' would drop the first 'model.y=..'
        cmd += ["-c", " ".join(toml_override(k, v) for k, v in run_config.items())]
    return cmd


def register_node_command(public_key: str | os.PathLike, *,
                          connection: str = CONNECTION) -> list[str]:
    """``flwr supernode register``: allow the node with this public key (SuperNode auth)."""
    return [_bin("flwr"), "supernode", "register", str(public_key), connection]


def wait_for_status(run_dir: str | os.PathLike, timeout: float,
                    poll: float = 0.5, *, since: float | None = None) -> dict[str, Any]:
    """Wait until the server's ``status.json`` in ``run_dir`` says ``finished`` or
    ``failed``; returns it. With ``since`` (a ``time.time()``), only a status written after
    it counts (a resumed run's folder still holds the status of the run before it).
    Raises ``TimeoutError``."""
    path = Path(run_dir) / "status.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            status = json.loads(path.read_text(encoding="utf-8"))
            if status["state"] in ("finished", "failed") and (
                    since is None or status["time"] >= since):
                return status
        time.sleep(poll)
    raise TimeoutError(f"{path}: the run did not finish within {timeout:.0f} s")


# -- fedrecon CLI subcommands ---------------------------------------------------------------
def _tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    if server:
        group.add_argument("--certificates", metavar="DIR",
                           help="folder with ca.crt, server.pem, server.key "
                                "(scripts/make_certificates.py)")
    else:
        group.add_argument("--root-certificates", metavar="CA_CERT",
                           help="the federation's CA certificate (ca.crt)")
    group.add_argument("--insecure", action="store_true",
                       help="no TLS (a test on one machine only)")


def _exec(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``cmd`` in the foreground; Ctrl-C stops it."""
    proc = subprocess.Popen(list(cmd), env=dict(env))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _cmd_server(args: argparse.Namespace) -> int:
    tls = None if args.insecure else TLSFiles.from_dir(args.certificates)
    cmd = superlink_command(port=args.port, host=args.host, tls=tls,
                            supernode_auth=args.enable_supernode_auth, database=args.database)
    return _exec(cmd, flower_env(args.flwr_home))


#: What ``flower-supernode`` (flwr 1.42) logs before it exits when the SuperLink refuses to
#: activate its node: ``[code: 2004] Failed to activate SuperNode.``
ACTIVATION_REFUSED = "[code: 2004]"


def run_supernode(cmd: Sequence[str], env: Mapping[str, str], *,
                  activation_wait: float = 120.0, retry_every: float = 5.0) -> int:
    """Run ``flower-supernode`` in the foreground, its output passed through; start it again
    while the SuperLink refuses to activate its node, for up to ``activation_wait`` seconds.

    Why: with SuperNode authentication a node's id is bound to its key, and flwr 1.42's
    SuperLink activates a node only when it is *offline*. A SuperNode that was killed
    (no ``DeactivateNode`` sent) counts as online until its last heartbeat expires
    (``HEARTBEAT_PATIENCE`` x 30 s, up to 60 s after the kill), and a restart within that
    window exits at once with exit code 305, ``[code: 2004] Failed to activate SuperNode``.
    """
    import signal

    deadline = time.monotonic() + activation_wait
    stopping = False

    def on_sigterm(*_: Any) -> None:  # reaches the SuperNode: a graceful stop deactivates
        nonlocal stopping             # its node, so a later start is activated at once
        stopping = True
        proc.terminate()

    while True:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        signal.signal(signal.SIGTERM, on_sigterm)
        refused = threading.Event()

        def pump(out: Any = proc.stdout, seen: threading.Event = refused) -> None:
            for line in out:  # until the SuperNode's children let go of the pipe too
                if ACTIVATION_REFUSED.encode() in line:
                    seen.set()
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()

        # the output is read in a thread and the SuperNode waited for here: its SuperExec
        # child exits only once its parent is reaped (a zombie still "exists" for it)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()
        reader.join(10.0)
        if (stopping or rc == 0 or not refused.is_set()
                or time.monotonic() + retry_every > deadline):
            return rc
        print(f"fedrecon: the SuperLink still counts this node as online (killed without "
              f"deactivating?); starting the SuperNode again in {retry_every:.0f} s",
              file=sys.stderr, flush=True)
        time.sleep(retry_every)
        if stopping:
            return rc


def site_command(*, superlink: str, site_config: str | os.PathLike, port: int,
                 root_certificates: str | os.PathLike | None = None,
                 auth_key: str | os.PathLike | None = None,
                 activation_wait: float | None = None) -> list[str]:
    """``fedrecon flower-site`` (as ``python -m fedrecon.runners.flower_cli``): the site's
    SuperNode, started again while the SuperLink refuses to activate it (:func:`run_supernode`)."""
    cmd = [sys.executable, "-m", "fedrecon.runners.flower_cli", "flower-site",
           "--site-config", str(Path(site_config).resolve()), "--superlink", superlink,
           "--port", str(port)]
    cmd += (["--root-certificates", str(root_certificates)] if root_certificates is not None
            else ["--insecure"])
    if auth_key is not None:
        cmd += ["--auth-key", str(auth_key)]
    if activation_wait is not None:
        cmd += ["--activation-wait", str(activation_wait)]
    return cmd


def _cmd_site(args: argparse.Namespace) -> int:
    from .site_config import load_site_config

    config = load_site_config(args.site_config)  # fail here, not in the first round
    print(f"site '{config.name}' ({config.spec.modality}), LOCAL state in "
          f"{config.runtime.state_dir}", file=sys.stderr, flush=True)
    cmd = supernode_command(superlink=args.superlink, site_config=args.site_config,
                            port=args.port, root_certificates=args.root_certificates,
                            auth_key=args.auth_key)
    return run_supernode(cmd, flower_env(args.flwr_home,
                                         torch_threads=config.runtime.torch_threads),
                         activation_wait=args.activation_wait)


def _parse_override(text: str) -> tuple[str, Any]:
    import tomllib

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"run config override {text!r}: expected KEY=VALUE")
    try:
        doc = tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        doc = {"v": value}  # a bare string
    parsed = doc["v"]
    # a run config value is a bool, number or string (flwr); one value, not a TOML document
    if len(doc) != 1 or not isinstance(parsed, (bool, int, float, str)):
        raise argparse.ArgumentTypeError(
            f"run config override {text!r}: the value of '{key}' must be a bool, a number "
            f"or a string; got {type(parsed).__name__}")
    return key, parsed


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 1..65535; got {text!r}")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0; got "
                                         f"{text!r}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    write_connection(home, args.superlink, root_certificates=args.root_certificates)
    overrides = dict(args.run_config or [])
    run_dir = overrides.get("run-dir")
    if args.wait and not (isinstance(run_dir, str) and run_dir):  # before the run starts
        print("--wait needs --run-config run-dir=... (a folder of this machine)", file=sys.stderr)
        return 2
    started = time.time()
    rc = _exec(run_command(overrides), flower_env(home))
    if rc != 0 or not args.wait:
        return rc
    try:
        status = wait_for_status(run_dir, args.timeout, since=started)
    except TimeoutError as err:
        print(f"fedrecon flower-run: {err}", file=sys.stderr)
        return 1
    print(json.dumps(status))
    return 0 if status["state"] == "finished" else 1


def _cmd_register(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    write_connection(home, args.superlink, root_certificates=args.root_certificates)
    return _exec(register_node_command(args.public_key), flower_env(home))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``flower-server``, ``flower-site``, ``flower-register`` and ``flower-run``."""
    p = subparsers.add_parser("flower-server", help="start the Flower SuperLink (coordinator)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=_port, default=9093)
    _tls_args(p, server=True)
    p.add_argument("--enable-supernode-auth", action="store_true",
                   help="accept only SuperNodes registered with flower-register")
    p.add_argument("--database", default=None, help="SQLite file of the SuperLink's state")
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_cmd_server)

    p = subparsers.add_parser("flower-site", help="start this site's Flower SuperNode")
    p.add_argument("--site-config", required=True,
                   help="the site's TOML file ([site] and one [[sites]] table)")
    p.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    _tls_args(p, server=False)
    p.add_argument("--auth-key", default=None,
                   help="the node's private key (SuperNode authentication)")
    p.add_argument("--port", type=_port, default=9094, help="the node's local Runtime API port")
    p.add_argument("--activation-wait", type=_seconds, default=120.0, metavar="SECONDS",
                   help="after a restart, keep starting the SuperNode while the SuperLink "
                        "still counts the killed one as online (default 120 s)")
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_cmd_site)

    p = subparsers.add_parser("flower-register",
                              help="register a SuperNode's public key with the SuperLink")
    p.add_argument("public_key", help="the node's public key (OpenSSH format, *.pub)")
    p.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    _tls_args(p, server=False)
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_cmd_register)

    p = subparsers.add_parser("flower-run", help="start a fedrecon run on a SuperLink")
    p.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    _tls_args(p, server=False)
    p.add_argument("--run-config", "-c", action="append", type=_parse_override,
                   metavar="KEY=VALUE", help="override a key of the app's run config")
    p.add_argument("--wait", action="store_true", help="wait until the run finishes")
    p.add_argument("--timeout", type=_seconds, default=24 * 3600.0)
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedrecon.runners.flower_cli <flower-server|flower-site|...>`` (the same
    subcommands as ``fedrecon``'s CLI)."""
    parser = argparse.ArgumentParser(prog="python -m fedrecon.runners.flower_cli",
                                     description=__doc__.split("\n\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from fedrecon.datasets.config import ConfigError

    try:
        return int(args.func(args))
    except (ConfigError, FileExistsError, FileNotFoundError) as err:  # as fedrecon's CLI
        print(f"fedrecon {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
