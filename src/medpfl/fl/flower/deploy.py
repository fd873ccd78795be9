"""A real Flower deployment: one SuperLink and one SuperNode per site as separate processes.

Secure by default: TLS from a self-signed CA generated here (with `cryptography`, which Flower itself
requires) and SuperNode authentication (each site's EC key registered with the SuperLink before it may
connect). `insecure=True` turns both off, only when the user asks. On one machine everything listens on
127.0.0.1 only; the README shows the same steps across several machines.

    python -m medpfl.fl.flower.deploy --sites 2 --rounds 2 --out runs/flower-deployment
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from medpfl.errors import MedPFLError
from medpfl.fl.flower.federation import FederationSpec
from medpfl.fl.settings import add_arguments, given

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """Paths of a CA certificate and of the SuperLink's certificate and key signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path


def write_certificates(folder: Path, hosts: tuple[str, ...] = (LOOPBACK, "localhost"), days: int = 30) -> Certificates:
    """A self-signed CA and a SuperLink certificate valid for `hosts` (IP addresses or DNS names).

    The CA's private key is not kept, so nothing else can ever be signed with it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MedPFL federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(paths.server_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (private, public), as Flower's node authentication reads it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_secret(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def _write_secret(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(data)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def write_app(folder: Path, spec: FederationSpec, out: Path, audit_rounds: list[int] | None = None,
              secure_aggregation: bool = False) -> Path:
    """A Flower App (a pyproject.toml) whose components are MedPFL's ServerApp and ClientApp, configured by `spec`
    (with `secure_aggregation`: the SecAgg+ pair of fl.flower.secagg)."""
    server, client = (("medpfl.fl.flower.secagg:server", "medpfl.fl.flower.secagg:app") if secure_aggregation
                      else ("medpfl.fl.flower.server_app:app", "medpfl.fl.flower.client_app:app"))
    folder.mkdir(parents=True, exist_ok=True)
    config = {**spec.to_config(), "out": str(out.resolve()),
              "audit-rounds": ",".join(str(r) for r in (audit_rounds or []))}
    lines = [f"{key} = {json.dumps(value)}" for key, value in config.items()]
    (folder / "pyproject.toml").write_text("\n".join([
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "medpfl-audit"', 'version = "1.0.0"',
        'description = "Federated training whose server audits what the sites send"', 'license = "MIT"',
        "dependencies = []  # MedPFL and Flower are installed on every machine beforehand", "",
        "[tool.flwr.app]", 'publisher = "medpfl"', "",
        "[tool.flwr.app.components]", f'serverapp = "{server}"', f'clientapp = "{client}"', "",
        "[tool.flwr.app.config]", *lines, ""]))
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class LocalDeployment:
    """A SuperLink and `sites` SuperNodes on this machine, each a process of its own (in its own process group)."""

    folder: Path
    sites: int
    insecure: bool = False
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        self.port = free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.folder / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
        self.certs = None if self.insecure else write_certificates(self.folder / "certificates")
        home = self.folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if self.insecure else f'root-certificates = "{self.certs.ca}"'
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          f'address = "{LOOPBACK}:{self.port}"\n{security}\n')

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("w")
        self.logs.append(log)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def _flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([self._tool("flwr"), *args], env=self.env, cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, then one SuperNode per site (each site's key registered first, unless insecure)."""
        link = [self._tool("flower-superlink"), "--host", LOOPBACK, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.insecure:
            link += ["--insecure"]
        else:
            link += ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.server_cert),
                     "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth"]
        self._start("superlink", link)
        self._wait_for_port(self.port, timeout)
        for site in range(self.sites):
            self.start_supernode(site, timeout=timeout)

    def start_supernode(self, site: int, register: bool = True, max_retries: int | None = None,
                        timeout: float = 60.0) -> subprocess.Popen:
        """Start site `site`'s SuperNode with a fresh key, registered with the SuperLink if `register`."""
        node = [self._tool("flower-supernode"), "--superlink", f"{LOOPBACK}:{self.port}",
                "--host", LOOPBACK, "--port", str(free_port()),
                "--node-config", f"partition-id={site} num-partitions={max(self.sites, site + 1)}"]
        if max_retries is not None:
            node += ["--max-retries", str(max_retries)]
        if self.insecure:
            return self._start(f"supernode{site}", node + ["--insecure"])
        private, public = write_node_key(self.folder / "keys", f"site{site}")
        if register:
            registered = self._flwr("supernode", "register", str(public), "local", timeout=timeout)
            if registered.returncode != 0:
                raise RuntimeError(f"Registering site {site}'s key failed: {registered.stdout}{registered.stderr}")
        node += ["--root-certificates", str(self.certs.ca), "--auth-supernode-private-key", str(private)]
        return self._start(f"supernode{site}", node)

    @staticmethod
    def _tool(name: str) -> str:
        return str(Path(sys.executable).parent / name)  # Flower's commands of this very environment

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"A Flower process exited early; see the logs in {self.folder}.")
            with socket.socket() as sock:
                if sock.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"The SuperLink did not listen on port {port} within {timeout:.0f} s.")

    def run(self, app: Path, out: Path, rounds: int, timeout: float = 300.0) -> None:
        """Submit the Flower App with `flwr run` and wait until `out/rounds.jsonl` holds every round."""
        deadline = time.monotonic() + timeout
        submitted = self._flwr("run", str(app), "local", timeout=timeout)
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed: {submitted.stdout}{submitted.stderr}")
        rounds_file = out / "rounds.jsonl"
        while time.monotonic() < deadline:
            if rounds_file.exists() and len(rounds_file.read_text().splitlines()) >= rounds:
                return
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"A Flower process exited during the run; see the logs in {self.folder}.")
            time.sleep(0.5)
        raise TimeoutError(f"The deployment did not finish {rounds} rounds within {timeout:.0f} s; "
                           f"see the logs in {self.folder}.")

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process this deployment started, with their children (each has its own process group)."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # children (SuperExec, app processes) share the group and may outlive their parent
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        for log in self.logs:
            log.close()

    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_local_deployment(spec: FederationSpec, out: Path, insecure: bool = False,
                         audit_rounds: list[int] | None = None, timeout: float = 300.0,
                         secure_aggregation: bool = False) -> Path:
    """Train `spec` through a SuperLink and one SuperNode per site on 127.0.0.1; results and observations in `out`."""
    out = Path(out).resolve()
    if (out / "rounds.jsonl").exists():
        raise MedPFLError(f"'{out}' already holds a deployment's rounds; pass a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    app = write_app(out / "flower-app", spec, out, audit_rounds, secure_aggregation)
    with LocalDeployment(out / "deployment", spec.sites, insecure) as deployment:
        deployment.run(app, out, spec.rounds, timeout)
    return out


def parse_arguments(argv: list[str] | None = None) -> tuple[FederationSpec, argparse.Namespace]:
    """The spec a deployment's command line asks for, and the rest of its options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = FederationSpec()
    add_arguments(parser, d)
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--audit-rounds", default="1")
    parser.add_argument("--out", type=Path, default=Path("runs/flower-deployment"))
    parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    parser.add_argument("--secure-aggregation", action="store_true", help="SecAgg+ between the sites")
    args = parser.parse_args(argv)
    return FederationSpec(**given(args), model=args.model, image_size=args.image_size), args


def main(argv: list[str] | None = None) -> None:
    spec, args = parse_arguments(argv)
    audit = [int(r) for r in args.audit_rounds.split(",") if r]
    print(run_local_deployment(spec, args.out, args.insecure, audit, secure_aggregation=args.secure_aggregation))


if __name__ == "__main__":
    main()
