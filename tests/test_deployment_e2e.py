"""Real deployment on loopback: TLS SuperLink with SuperNode authentication + 2 registered SuperNodes + an
unregistered intruder + ``flwr run . <connection> --stream``.

The documented path (docs/federation.md §4): ``deploy/make_dev_certs.sh`` for TLS,
``deploy/make_node_keys.sh`` for the hospitals' key pairs, ``flwr supernode register`` of
their public keys, ``flower-superlink --enable-supernode-auth``. A third SuperNode that holds
the CA certificate and a key pair of its own, never registered, must not take part.

Everything runs as subprocesses in their own process groups; the ``finally`` block kills
every group this test started, even when an assertion or a timeout fails first. Nothing
leaves the machine: the connection is ``127.0.0.1`` with a dev CA made in ``tmp_path``,
``FLWR_HOME`` is in ``tmp_path`` and runtime dependency installation is disabled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from simulations.tiny_federation import tiny_federation_values

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = tiny_federation_values(
    federation={"num_clients": 2, "num_rounds": 2, "local_steps": 2, "min_available_clients": 2, "round_timeout_s": 300}
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{log.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def make_node_keys(folder: Path, names: list[str]) -> None:
    """The hospitals' key pairs: deploy/make_node_keys.sh (ssh-keygen), or the same ECDSA P-384 OpenSSH keys
    written with ``cryptography`` (a Flower dependency) on a machine without ssh-keygen."""
    if shutil.which("ssh-keygen") is not None:
        subprocess.run(["bash", str(REPO / "deploy" / "make_node_keys.sh"), str(folder), *names], check=True,
                       capture_output=True, timeout=60)
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / name).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
        (folder / name).chmod(0o600)
        (folder / f"{name}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                           serialization.PublicFormat.OpenSSH))


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("flower-superlink") is None,
                    reason="needs openssl and the Flower CLIs")
def test_tls_deployment_two_supernodes_two_rounds(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "deploy" / "make_dev_certs.sh"), str(certs)], check=True, capture_output=True,
                   timeout=120)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    out_dir = tmp_path / "out"
    link_port = free_port()
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1", "FOPRO_KD_CACHE": str(tmp_path / "cache")}
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log_name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / log_name
        proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        procs.append(proc)
        return proc, log

    keys = tmp_path / "keys"
    make_node_keys(keys, ["site-0", "site-1", "intruder"])
    try:
        link, link_log = start([
            "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--host", "127.0.0.1", "--port", str(link_port),
            "--disable-runtime-dependency-installation", "--enable-supernode-auth",
        ], "superlink.log")
        wait_for_port(link_port, 60, link, link_log)
        for k in range(2):  # the coordinator registers the hospitals' public keys
            registered = subprocess.run(["flwr", "supernode", "register", str(keys / f"site-{k}.pub"), "e2e"],
                                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for k, name in ((0, "site-0"), (1, "site-1"), (0, "intruder")):
            start([
                "flower-supernode", "--root-certificates", str(certs / "ca.crt"),
                "--superlink", f"127.0.0.1:{link_port}", "--port", str(free_port()),
                "--auth-supernode-private-key", str(keys / name),
                "--node-config", f"partition-id={k} num-partitions=2 state-dir='{tmp_path / f'state-{name}'}'",
            ], f"supernode-{name}.log")
        run_config = f"config-file='{config_file}' out-dir='{out_dir}'"
        runner, _ = start(["flwr", "run", str(REPO), "e2e", "--stream", "--run-config", run_config], "run.log")
        returncode = runner.wait(timeout=480)
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
        assert returncode == 0, f"flwr run failed with {returncode}:\n{logs}"
        assert (out_dir / "metrics.json").is_file(), f"no metrics.json:\n{logs}"
        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["rounds"] == 2 and metrics["best_round"] in (1, 2)
        assert set(metrics["per_site"]) == {"site-0", "site-1"}
        assert (out_dir / "history.csv").read_text().count("\n") == 4  # header + rounds 0, 1, 2
        for k in range(2):  # each hospital kept its own state between the two rounds
            assert list((tmp_path / f"state-site-{k}").glob(f"run-*/site-{k}/client_state.pt"))
        # the unregistered node never trained: no state, and two nodes only in the round (weights of 2 sites)
        assert not list((tmp_path / "state-intruder").glob("**/client_state.pt")), logs
        assert sum(1 for w in metrics.get("per_site", {})) == 2
        listed = subprocess.run(["flwr", "supernode", "list", "e2e", "--format", "json"], capture_output=True,
                                text=True, env=env, cwd=tmp_path, timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
        assert len(nodes) == 2, f"only the two registered keys may be SuperNodes: {nodes}"
    finally:
        for proc in reversed(procs):
            kill_group(proc)
