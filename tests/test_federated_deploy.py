"""Flower's deployment engine: the warm ClientApp worker and the ServerApp's polling grid (fast
unit tests), and a real federation on loopback with TLS and SuperNode authentication (README,
"A secure federation"; ``slow``): a CA and a server certificate for 127.0.0.1 made for the test,
a SuperLink that admits only SuperNodes whose public keys were registered with ``flwr supernode
register``, two registered SuperNodes in process isolation, each with a warm clsim worker, and
two that must be refused: one with a key nobody registered, one with no key.

Every process runs in its own session and is killed with its children at the end; every wait
is bounded; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import copy
import datetime
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("flwr")
x509 = pytest.importorskip("cryptography.x509")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from clsim.cli import main  # noqa: E402
from clsim.federated.loopback import BIN, Processes, flwr_env, free_port, wait_for_port  # noqa: E402
from test_federated import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the polling grid, the worker's checks

class FakeGrid:
    """Replies to message k arrive at the ``ready[k]``-th pull; counts pulls."""

    def __init__(self, ready: list[int]):
        self.ready, self.pulls, self.other = ready, 0, "kept"

    def push_messages(self, messages):
        return [f"m{k}" for k in range(len(list(messages)))]

    def pull_messages(self, ids):
        self.pulls += 1
        due = [k for k, at in enumerate(self.ready) if at == self.pulls and f"m{k}" in set(ids)]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{k}")) for k in due]


def test_the_polling_grid_pulls_until_every_reply_arrived_and_stops_at_the_timeout():
    from clsim.federated.server_app import PollingGrid

    grid = FakeGrid(ready=[1, 3, 3])
    started = time.monotonic()
    replies = PollingGrid(grid, poll_s=0.01).send_and_receive(["a", "b", "c"], timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and time.monotonic() - started < 1.0  # 2 sleeps of 0.01 s, not Flower's 3 s
    late = FakeGrid(ready=[1, 10**9])
    replies = PollingGrid(late, poll_s=0.01).send_and_receive(["a", "b"], timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and 5 <= late.pulls <= 12
    assert PollingGrid(late).other == "kept"  # everything else is the wrapped grid's


def test_poll_s_in_the_run_config_is_checked():
    from clsim.errors import ConfigError
    from clsim.federated.server_app import POLL_S, poll_seconds

    assert poll_seconds({}) == POLL_S and poll_seconds({"poll-s": 0.5}) == 0.5
    for bad in (0, -1, "x", float("nan"), 61):
        with pytest.raises(ConfigError, match="poll-s"):
            poll_seconds({"poll-s": bad})


def fab(pyproject: str) -> SimpleNamespace:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return SimpleNamespace(content=buffer.getvalue())


def test_the_worker_runs_only_clsims_client_app():
    from clsim.federated.server_app import APP_PYPROJECT
    from clsim.federated.worker import CLIENT_APP, check_app

    check_app(fab(APP_PYPROJECT))  # the app clsim writes
    other = APP_PYPROJECT.replace(f'clientapp = "{CLIENT_APP}"', 'clientapp = "evil:app"')
    assert other != APP_PYPROJECT
    with pytest.raises(PermissionError, match="evil:app"):
        check_app(fab(other))


def test_the_worker_command_line(tmp_path):
    from clsim.federated.worker import parse_args

    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    opts = parse_args(["--runtime-api-address", "127.0.0.1:9101", "--root-certificates", str(ca)])
    assert (opts.address, opts.insecure, opts.root_certificates, opts.poll_s) == ("127.0.0.1:9101", False,
                                                                                 str(ca), 0.1)
    for bad in (["--insecure", "--root-certificates", str(ca)],  # one or the other
                ["--poll-s", "0"], ["--root-certificates", str(tmp_path / "missing.crt")],
                ["--insecure", "--superexec-auth-secret-file", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# ---------------------------------------------------------------- certificates and keys

def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clsim test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def test_the_test_ca_signs_a_certificate_for_loopback(tmp_path):
    """The certificates verify as a TLS client would check them (quick; no Flower process)."""
    import ssl

    ca, cert, key = make_tls(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            conn, _ = listener.accept()
            import threading

            accepted = threading.Thread(target=lambda: server.wrap_socket(conn, server_side=True).close())
            accepted.start()
            with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.getpeercert()["subjectAltName"] == (("DNS", "localhost"), ("IP Address", "127.0.0.1"))
            accepted.join(timeout=5)
    private, public = make_node_key(tmp_path, "node")
    loaded = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


# ---------------------------------------------------------------- processes

def flwr(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def unsigned_acquire_refused(address: str) -> bool:
    """A task request to a SuperNode that has a SuperExec secret, without the secret, is refused."""
    import httpx
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    from clsim.federated.worker import Options, _client, acquire

    client = _client(Options(address, insecure=True), RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                     retry=False)
    try:
        acquire(client)
    except httpx.HTTPStatusError as ex:
        return ex.response.status_code in (401, 403)
    finally:
        client.close()
    return False


# ---------------------------------------------------------------- the federation

@pytest.mark.slow
def test_a_tls_federation_admits_only_registered_supernodes_and_matches_inprocess(tmp_path):
    raw = copy.deepcopy(tiny(num_clients=2, rounds_per_experience=1)) | {"name": "fed_secure", "seed": 3}
    raw["federated"].pop("backend")
    config = tmp_path / "secure.yaml"
    config.write_text(yaml.safe_dump(raw))
    ca, cert, key = make_tls(tmp_path / "tls")
    keys = {name: make_node_key(tmp_path, name) for name in ("node0", "node1", "stranger")}
    link, out = free_port(), tmp_path / "secure_run"
    env = flwr_env(tmp_path / "flwr_home", "secure", link, root_certificates=ca)
    assert subprocess.run([sys.executable, "-m", "clsim.federated.server_app", str(tmp_path / "app")],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode == 0
    procs = Processes(tmp_path, env)
    tls = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]

    def supernode(name: str, partition: int, *auth: str, retries: bool = True) -> subprocess.Popen:
        give_up = [] if retries else ["--max-retries", "2", "--max-wait-time", "20"]
        return procs.start(name, str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link}",
                           "--root-certificates", str(ca), *auth, *give_up,
                           "--isolation", "process", "--port", str(ports[name]),
                           "--node-config", f"partition-id={partition} num-partitions=2")

    ports = {name: free_port() for name in ("node0", "node1", "stranger", "keyless")}
    secret = tmp_path / "superexec.secret"  # only the node's own worker may take its tasks
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    try:
        procs.start("superlink", str(BIN / "flower-superlink"), *tls, "--enable-supernode-auth",
                    "--database", ":flwr-in-memory:", "--port", str(link))
        wait_for_port(link)
        for name in ("node0", "node1"):  # the allow-list: public keys registered over the Control API
            done = flwr(env, tmp_path, "supernode", "register", str(keys[name][1]), "secure")
            assert done.returncode == 0, done.stdout + done.stderr
        # refused: a key nobody registered, and no key at all
        stranger = supernode("stranger", 0, "--auth-supernode-private-key", str(keys["stranger"][0]),
                             retries=False)
        keyless = supernode("keyless", 1, retries=False)
        for k in range(2):
            # node 0 serves its Runtime API (to the worker) over TLS too, node 1 on plain loopback
            runtime_tls = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca)]
            supernode(f"node{k}", k, "--auth-supernode-private-key", str(keys[f"node{k}"][0]),
                      "--superexec-auth-secret-file", str(secret), *(runtime_tls if k == 0 else []))
            wait_for_port(ports[f"node{k}"])
            procs.start(f"worker{k}", sys.executable, "-m", "clsim.federated.worker",
                        "--runtime-api-address", f"127.0.0.1:{ports[f'node{k}']}",
                        *(["--root-certificates", str(ca)] if k == 0 else ["--insecure"]),
                        "--superexec-auth-secret-file", str(secret))
        assert unsigned_acquire_refused(f"127.0.0.1:{ports['node1']}")
        for proc in (stranger, keyless):
            assert proc.wait(timeout=120) != 0
        run = flwr(env, tmp_path, "run", str(tmp_path / "app"), "secure", "--stream", "--run-config",
                   f"config='{config}' out='{out}'", timeout=420)
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
        listed = flwr(env, tmp_path, "supernode", "list", "secure", "--format", "json")
    finally:
        procs.stop()
    for name in ("stranger", "keyless"):
        assert "SuperNode ID" not in procs.log(name), procs.log(name)[-2000:]
    link_log = procs.log("superlink")  # refused by the SuperLink, and why
    assert "No SuperNode found with the given public key" in link_log  # the stranger's key
    assert "register-node" in link_log  # the keyless node tried to register itself: disabled
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == 2, listed.stdout  # only the registered keys ever became nodes
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(sorted(r["aggregated"]) == [0, 1] for r in metrics["rounds"]) and len(metrics["rounds"]) == 2
    worked = procs.log("worker0") + procs.log("worker1")
    assert worked.count("train done") == 2 * 2 and "failed" not in worked
    # The same numbers as the in-process engine: the deployment changes the transport, not the run.
    assert main(["run", str(config), "--out", str(tmp_path / "inproc"), "--quiet",
                 "--set", "federated.backend=inprocess"]) == 0
    inproc = json.loads((tmp_path / "inproc" / "metrics.json").read_text())
    for key in ("accuracy_matrix", "communication_bytes", "client_accuracy"):
        assert metrics[key] == inproc[key], key


@pytest.mark.slow
def test_on_loopback_a_supernode_refuses_a_plugin_it_does_not_allow(tmp_path):
    """Issue 16, point 3 on real SuperNodes: node 0 allows the SI plugin file, node 1 allows
    nothing; node 1's worker logs the refusal, and the server records it as node 1's failure in
    every round while node 0's training goes on."""
    raw = copy.deepcopy(tiny(num_clients=2, rounds_per_experience=1)) | {"name": "fed_refuse", "seed": 3}
    raw["federated"].pop("backend")
    raw["strategy"] = {"plugin": str(ROOT / "strategies" / "si.py") + ":SI", "lambda": 1.0}
    config = tmp_path / "refuse.yaml"
    config.write_text(yaml.safe_dump(raw))
    link, out = free_port(), tmp_path / "refuse_run"
    env = flwr_env(tmp_path / "flwr_home", "local", link,
                   base={k: v for k, v in os.environ.items() if k != "CLSIM_SIMULATED_CLIENTS"})
    assert subprocess.run([sys.executable, "-m", "clsim.federated.server_app", str(tmp_path / "app")],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode == 0
    procs = Processes(tmp_path, env)
    allow = {0: f" allow-code='{ROOT}/strategies/*.py'", 1: ""}
    try:
        procs.start("superlink", str(BIN / "flower-superlink"), "--insecure", "--database", ":flwr-in-memory:",
                    "--port", str(link))
        wait_for_port(link)
        for k in range(2):
            port = free_port()
            procs.start(f"node{k}", str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                        "--isolation", "process", "--port", str(port),
                        "--node-config", f"partition-id={k} num-partitions=2{allow[k]}")
            wait_for_port(port)
            procs.start(f"worker{k}", sys.executable, "-m", "clsim.federated.worker",
                        "--runtime-api-address", f"127.0.0.1:{port}", "--insecure")
        run = flwr(env, tmp_path, "run", str(tmp_path / "app"), "local", "--stream", "--run-config",
                   f"config='{config}' out='{out}'", timeout=540)
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        procs.stop()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        assert record["aggregated"] == [0], record
        assert "this node does not run" in record["failed"]["1"] and "allow-code" in record["failed"]["1"]
    assert "this node does not run" in procs.log("worker1") and "this node does not run" not in procs.log("worker0")
