"""`fedclinic certs`: the certificates pass a real TLS handshake and Flower reads the SuperNode keys."""

import argparse
import socket
import ssl
import stat
import threading
from datetime import timedelta

import pytest
from cryptography import x509

from fedclinic.cli.certs import certs, certs_parser
from fedclinic.config import ConfigError
from fedclinic.runtime.certs import make_ca, make_server_cert, make_supernode_keys, write_certs

HOSTS = ["localhost", "127.0.0.1", "superlink.hospital.org"]


def run_cli(*argv: str) -> int:
    """The command as the lead will register it: a subparser plus its handler."""
    parser = argparse.ArgumentParser(prog="fedclinic")
    certs_parser(parser.add_subparsers(dest="command", required=True))
    return certs(parser.parse_args(["certs", *argv]))


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    assert run_cli("--out", str(out), "--hosts", ",".join(HOSTS), "--supernodes", "2") == 0
    return out


class TLSServer:
    """Serves superlink.crt/key on an ephemeral port of 127.0.0.1, one thread, answering b"ok"."""

    def __init__(self, cert_dir):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_dir / "superlink.crt", cert_dir / "superlink.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass  # the client refused us; that is what some tests want

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def server(cert_dir):
    srv = TLSServer(cert_dir)
    yield srv
    srv.close()


def handshake(port: int, cafile, server_hostname: str) -> bytes:
    """Connect like a SuperNode would: trust only `cafile` and check the name it dialled."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          context.wrap_socket(raw, server_hostname=server_hostname) as tls):
        return tls.recv(2)


def test_a_client_trusting_the_ca_verifies_the_superlink_by_name_and_by_ip(cert_dir, server):
    # Execute
    by_name = handshake(server.port, cert_dir / "ca.crt", "localhost")
    by_ip = handshake(server.port, cert_dir / "ca.crt", "127.0.0.1")

    # Assert
    assert by_name == by_ip == b"ok"


def test_a_client_trusting_another_ca_is_refused(cert_dir, server, tmp_path):
    # Prepare: a second, unrelated run
    assert run_cli("--out", str(tmp_path)) == 0

    # Execute / Assert
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(server.port, tmp_path / "ca.crt", "localhost")


def test_a_host_name_outside_the_certificate_is_refused(cert_dir, server):
    with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
        handshake(server.port, cert_dir / "ca.crt", "elsewhere.hospital.org")


def test_the_server_certificate_names_every_host_and_is_signed_by_the_ca(cert_dir):
    # Prepare
    ca = x509.load_pem_x509_certificate((cert_dir / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((cert_dir / "superlink.crt").read_bytes())

    # Execute
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]

    # Assert
    cert.verify_directly_issued_by(ca)
    assert sorted(names) == sorted(HOSTS)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=365, minutes=5)


def test_flower_loads_each_supernode_key_and_its_public_half_matches(cert_dir):
    # Prepare: the very functions behind `flower-supernode --auth-supernode-private-key`
    # and `flwr supernode register`
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message, verify_signature
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for k in range(2):
        # Execute
        args = argparse.Namespace(auth_supernode_private_key=str(cert_dir / f"supernode-{k}"),
                                  auth_supernode_public_key=None)
        private_key, public_key = _try_setup_client_authentication(args)
        registered = try_load_public_key(cert_dir / f"supernode-{k}.pub")

        # Assert: what the SuperLink stores is the key the SuperNode signs with
        assert registered == public_key_to_bytes(public_key)
        assert verify_signature(public_key, b"node", sign_message(private_key, b"node"))
    assert try_load_public_key(cert_dir / "supernode-0.pub") != try_load_public_key(cert_dir / "supernode-1.pub")


def test_private_keys_are_readable_by_their_owner_only(cert_dir):
    for name in ["ca.key", "superlink.key", "supernode-0", "supernode-1"]:
        assert stat.S_IMODE((cert_dir / name).stat().st_mode) == 0o600, name


def test_existing_files_are_kept_unless_forced(tmp_path, capsys):
    # Prepare
    assert run_cli("--out", str(tmp_path), "--supernodes", "1") == 0
    before = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / "supernode-0").chmod(0o644)

    # Execute / Assert: refused, one sentence naming the file, nothing written
    with pytest.raises(ConfigError, match=r"ca\.crt already exists; pass --force"):
        run_cli("--out", str(tmp_path), "--supernodes", "2")
    assert (tmp_path / "ca.crt").read_bytes() == before
    assert not (tmp_path / "supernode-1").exists()

    # Execute / Assert: forced, new files, private keys back to 600
    assert run_cli("--out", str(tmp_path), "--supernodes", "2", "--force") == 0
    assert (tmp_path / "ca.crt").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "supernode-0").stat().st_mode) == 0o600
    assert (tmp_path / "supernode-1.pub").exists()


def test_the_summary_names_each_file_with_its_flower_flag(tmp_path, capsys):
    # Execute
    run_cli("--out", str(tmp_path), "--supernodes", "2")
    out = capsys.readouterr().out

    # Assert
    d = str(tmp_path)
    assert f"--ssl-ca-certfile {d}/ca.crt --ssl-certfile {d}/superlink.crt --ssl-keyfile {d}/superlink.key" in out
    assert f"flwr supernode register {d}/supernode-1.pub" in out
    assert f"--root-certificates {d}/ca.crt --auth-supernode-private-key {d}/supernode-1" in out


@pytest.mark.parametrize("argv, message", [
    (["--hosts", ""], "empty entry"),
    (["--hosts", "localhost,,127.0.0.1"], "empty entry"),
    (["--hosts", "127.0.0.300"], "valid IPv4 or IPv6 address, got '127.0.0.300'"),
    (["--hosts", "fe80::zz"], "valid IPv4 or IPv6 address"),
    (["--hosts", "super link"], "host name of letters"),
    (["--supernodes", "0"], "at least 1 SuperNode key, got 0"),
    (["--days", "0"], "at least 1 day, got 0"),
])
def test_bad_settings_are_one_sentence_and_write_nothing(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        run_cli("--out", str(tmp_path / "certs"), *argv)
    assert not (tmp_path / "certs").exists()


def test_the_core_functions_reject_bad_values():
    ca = make_ca(days=1)
    with pytest.raises(ValueError, match="at least one host"):
        make_server_cert(ca, [])
    with pytest.raises(ValueError, match="at least 1 day"):
        make_ca(days=0)
    with pytest.raises(ValueError, match="at least 1 SuperNode"):
        make_supernode_keys(0)
    with pytest.raises(ValueError, match="at least 1 SuperNode"):
        write_certs("unused", ["localhost"], 0)


def test_the_superlink_certificate_always_names_loopback_for_flowers_own_superexec(tmp_path):
    # the SuperExec that starts each ServerApp dials the SuperLink on 127.0.0.1 and checks this certificate
    write_certs(tmp_path, hosts=["superlink.hospital.org", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert sorted(names) == sorted(["superlink.hospital.org", "10.0.0.5", "localhost", "127.0.0.1"])
