"""The pieces of a Flower deployment that need no processes: run config parsing, the
``flwr run`` overrides, site configuration files, certificates, the shipped app."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from fedrecon.datasets import ConfigError

from fedrecon.runners.flower import FlowerRunConfig, arrays_to_state, state_to_arrays
from fedrecon.runners.flower_cli import APP_DIR, run_command, supernode_command
from fedrecon.runners.site_config import load_site_config, site_config_to_toml

sys.path.insert(0, str(Path(__file__).parent))
from _federation import RUN_CONFIG, ct_node_context, write_ct_site

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_app_config_parses_and_validates():
    from flwr.common.config import flatten_dict, validate_config

    doc = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(doc, check_module=True, project_dir=APP_DIR)
    assert ok, errors
    cfg = FlowerRunConfig.from_run_config(flatten_dict(doc["tool"]["flwr"]["app"]["config"]))
    assert cfg.strategy_name == "fedavg" and cfg.build_strategy().name == "fedavg"


def test_run_config_is_strict():
    with pytest.raises(ValueError, match="unknown key 'num-rounds'"):
        FlowerRunConfig.from_run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="'min-sites' must be int"):
        FlowerRunConfig.from_run_config({"min-sites": "2"})
    with pytest.raises(ValueError, match="chanz"):
        FlowerRunConfig.from_run_config({"model.chanz": 3})


def test_all_overrides_reach_the_run():
    # flwr merges separate -c documents at the top level: one -c carries every key
    from flwr.common.config import parse_config_args

    cmd = run_command({**RUN_CONFIG, "run-dir": "/tmp/a b/run"})
    assert cmd.count("-c") == 1
    parsed = parse_config_args([cmd[cmd.index("-c") + 1]])
    assert parsed == {**RUN_CONFIG, "run-dir": "/tmp/a b/run"}
    assert FlowerRunConfig.from_run_config(parsed).model.chans == 4


def test_arrays_keep_names_and_values():
    import torch

    state = {"a.weight": torch.randn(3, 2), "b.bias": torch.arange(4, dtype=torch.int64)}
    back = arrays_to_state(state_to_arrays(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype


def test_site_config_round_trip_and_errors(tmp_path):
    cfg = write_ct_site(tmp_path, 0)
    path = tmp_path / "site.toml"
    path.write_text(site_config_to_toml(cfg))
    assert load_site_config(path) == cfg
    cmd = supernode_command(superlink="127.0.0.1:1", site_config=path, port=2)
    assert f'site-config="{path.resolve()}"' in cmd
    path.write_text(site_config_to_toml(cfg).replace("state_dir", "state_folder"))
    with pytest.raises(ConfigError, match="unknown key 'state_folder'"):
        load_site_config(path)


def test_certificates_chain_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    spec = importlib.util.spec_from_file_location("make_certificates",
                                                  ROOT / "scripts" / "make_certificates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.make_certificates(tmp_path, sans=["superlink.example.org"], nodes=["a"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    key = load_ssh_private_key(paths["nodes/a"].read_bytes(), None)
    pub = load_ssh_public_key(paths["nodes/a.pub"].read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
    assert key.public_key().public_numbers() == pub.public_numbers()
    assert paths["ca.key"].stat().st_mode & 0o077 == 0


def test_site_launcher_restarts_only_a_refused_activation(tmp_path, capsys):
    """``fedrecon flower-site`` starts the SuperNode again while the SuperLink refuses to
    activate its node (flwr's ``[code: 2004]``), and not after any other exit."""
    from fedrecon.runners.flower_cli import ACTIVATION_REFUSED, run_supernode

    count = tmp_path / "count"
    fake = tmp_path / "fake.py"
    fake.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(count)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "refusals, code = int(sys.argv[1]), int(sys.argv[2])\n"
        f"print({ACTIVATION_REFUSED!r} + ' Failed to activate SuperNode.' if n <= refusals "
        "else 'SuperNode ID: 1', flush=True)\n"
        "sys.exit(1 if n <= refusals else code)\n")
    rc = run_supernode([sys.executable, str(fake), "2", "0"], {}, activation_wait=30.0,
                       retry_every=0.01)
    assert rc == 0 and count.read_text() == "3"
    count.unlink()
    rc = run_supernode([sys.executable, str(fake), "0", "3"], {}, activation_wait=30.0,
                       retry_every=0.01)  # another failure: no restart
    assert rc == 3 and count.read_text() == "1"
    count.unlink()
    rc = run_supernode([sys.executable, str(fake), "5", "0"], {}, activation_wait=0.0,
                       retry_every=0.01)  # gives up after activation_wait
    assert rc == 1 and count.read_text() == "1"


def test_resume_refuses_another_computation(tmp_path):
    """A resumed run may change its length, not its seed, strategy or model."""
    import torch

    from fedrecon.runners.flower_server import CHECKPOINT_FORMAT, FlowerServer

    cfg = FlowerRunConfig.from_run_config({**RUN_CONFIG, "run-dir": str(tmp_path)})
    torch.save({"format": CHECKPOINT_FORMAT, "runner": "flower", "strategy_name": "fedavg",
                "config": {**cfg.as_dict(), "seed": 1, "num_server_rounds": 7}},
               tmp_path / "checkpoint.pt")
    server = FlowerServer(None, FlowerRunConfig.from_run_config(
        {**RUN_CONFIG, "run-dir": str(tmp_path), "resume": True}))
    with pytest.raises(ValueError, match=r"other seed than the run had \(seed=1\)"):
        server._restore()


def test_a_repeated_round_starts_from_the_state_before_it(tmp_path):
    """The ClientApp's site store: a fit repeating the round of the last fit of the same
    run (a run resumed from the checkpoint before that round) starts from the state before
    the first try and saves the very same state; a fit of another run trains on top."""
    from fedrecon.federated import SiteInstructions, TrainingPlan
    from fedrecon.runners.flower import _NodeSite, persisted_state

    context, cfg = ct_node_context(tmp_path)
    node = _NodeSite(context)
    state_dir = Path(cfg.runtime.state_dir)
    start = node.site.initial_global_state()
    plan = TrainingPlan(local_steps=1, lr=1e-3)

    def fit(r, key):
        return node.fit(SiteInstructions(r, "ct0", start, plan), run_key=key)

    fit(0, "a")
    s0 = persisted_state(state_dir, "ct0")
    u1 = fit(1, "a")
    s1 = persisted_state(state_dir, "ct0")
    u1_again = fit(1, "a")  # repeated: from s0 again, to s1 again
    assert persisted_state(state_dir, "ct0") == s1
    for k in u1.tensors:
        assert torch.equal(u1.tensors[k], u1_again.tensors[k]), k
    journal = [json.loads(s) for s in (state_dir / "journal.jsonl").read_text().splitlines()]
    assert [(j["round"], j["repeat"]) for j in journal] == [(0, False), (1, False), (1, True)]
    assert journal[2]["loaded"] == journal[1]["loaded"] == s0
    fit(1, "b")  # round 1 of another run: on top of what the site has
    assert journal[-1]["saved"] == s1
    last = json.loads((state_dir / "journal.jsonl").read_text().splitlines()[-1])
    assert last["loaded"] == s1 and not last["repeat"]
    assert last["saved"] != s1 and last["saved"]["round"] == 1
