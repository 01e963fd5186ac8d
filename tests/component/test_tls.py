"""etcd over TLS with client certificates: the registry adapter and fleetctl's --ca-file,
--cert-file and --key-file against a real etcd that requires them. Certificates are made here with
openssl, for 127.0.0.1 only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from fleetd.errors import ConfigError, RegistryUnavailable
from fleetd.model import DesiredState
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import UnitRecord
from fleetd.unitfile import content_hash
from tests.support.bulk import bulk_pages

pytestmark = [
    pytest.mark.component,
    pytest.mark.skipif(
        not (shutil.which("openssl") and shutil.which("etcd")), reason="needs openssl and etcd"
    ),
]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=folder,
    )
    (folder / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            f"{name}.crt",
            cwd=folder,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    _certificates(folder)
    client, peer = _free_port(), _free_port()
    url = f"https://127.0.0.1:{client}"
    log = (folder / "etcd.log").open("w")
    proc = subprocess.Popen(
        [
            "etcd",
            "--name",
            "tls",
            "--data-dir",
            str(folder / "data"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"tls=http://127.0.0.1:{peer}",
            "--cert-file",
            str(folder / "server.crt"),
            "--key-file",
            str(folder / "server.key"),
            "--trusted-ca-file",
            str(folder / "ca.crt"),
            "--client-cert-auth",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                registry = EtcdRegistry(
                    url,
                    "/tls/",
                    timeout=2,
                    ca_file=str(folder / "ca.crt"),
                    cert_file=str(folder / "client.crt"),
                    key_file=str(folder / "client.key"),
                )
                registry.snapshot()
                registry.close()
                break
            except RegistryUnavailable:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url, folder
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


TLS_UNIT = "[Service]\nExecStart=/bin/true\n"


def _tls_registry(
    url: str, folder: Path, transport: Literal["grpc", "http"] = "grpc"
) -> EtcdRegistry:
    return EtcdRegistry(
        url,
        "/tls/",
        ca_file=str(folder / "ca.crt"),
        cert_file=str(folder / "client.crt"),
        key_file=str(folder / "client.key"),
        transport=transport,
    )


def _write_tls_unit(registry: EtcdRegistry) -> bool:
    return registry.write_units(
        [UnitRecord("tls.service", TLS_UNIT, content_hash(TLS_UNIT))],
        DesiredState.LAUNCHED,
        registry.snapshot(),
    )


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_registry_reads_and_writes_over_tls(
    tls_etcd: tuple[str, Path], transport: Literal["grpc", "http"]
) -> None:
    url, folder = tls_etcd
    registry = _tls_registry(url, folder, transport)
    text = TLS_UNIT
    assert _write_tls_unit(registry)
    snap = registry.snapshot()
    assert snap.units["tls.service"].text == text
    assert snap.desired_state("tls.service") is DesiredState.LAUNCHED
    registry.close()


def test_a_large_read_over_https_goes_on_over_grpc_with_the_same_files(
    tls_etcd: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gRPC part of a large read (`fleetd.registry.BULK_READ_KEYS`) is made with the CA,
    certificate and key the JSON gateway's part was: none of it falls back to HTTP."""
    url, folder = tls_etcd
    registry = _tls_registry(url, folder, "http")
    names = [f"bulk@{i}.service" for i in range(60)]
    try:
        records = [UnitRecord(n, TLS_UNIT, content_hash(TLS_UNIT)) for n in names]
        assert registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot())
        pages = bulk_pages(monkeypatch)
        assert set(names) <= set(registry.snapshot().units)
        assert len(pages) >= 2  # 120 keys and more, after a first page of 40
    finally:
        registry.destroy(names)
        registry.close()


def test_https_without_a_ca_file_is_a_config_error(tls_etcd: tuple[str, Path]) -> None:
    url, _ = tls_etcd
    with pytest.raises(ConfigError, match="--ca-file"):
        EtcdRegistry(url, "/tls/")


def test_fleetctl_over_tls(tls_etcd: tuple[str, Path]) -> None:
    url, folder = tls_etcd
    # Its own unit to list: with tests spread over workers, the write test may run elsewhere.
    registry = _tls_registry(url, folder)
    assert _write_tls_unit(registry)
    registry.close()
    fleetctl = str(Path(sys.executable).with_name("fleetctl"))
    base = [fleetctl, "--endpoint", url, "--etcd-key-prefix", "/tls/"]
    tls = [
        "--ca-file",
        str(folder / "ca.crt"),
        "--cert-file",
        str(folder / "client.crt"),
        "--key-file",
        str(folder / "client.key"),
    ]
    ok = subprocess.run(
        [*base[:1], *tls, *base[1:], "list-unit-files", "--no-legend"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[0] == "tls.service"
    # Without the client certificate etcd refuses the handshake: one line, exit 1.
    refused = subprocess.run(
        [
            *base[:1],
            "--request-timeout",
            "2",
            "--ca-file",
            str(folder / "ca.crt"),
            *base[1:],
            "list-unit-files",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fleetctl: cannot reach etcd at {url}"), lines
