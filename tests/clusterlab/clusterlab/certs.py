"""The cluster's certificates for the lab, made with the `openssl` command: a CA, and for each
node a certificate from it naming the node (a DNS name) for both ends of a TLS connection, as
the `[cluster]` section wants them (`ca`, `cert`, `key`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

DAYS = "30"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def make_ca(directory: Path) -> Path:
    """`directory/ca.pem` and `ca.key` (P-256); returns the certificate's path."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", DAYS, "-subj", "/CN=mqttd lab CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    (directory / "ca.key").chmod(0o600)
    return directory / "ca.pem"


def make_node(directory: Path, name: str) -> tuple[Path, Path]:
    """`directory/<name>.pem` and `<name>.key`, signed by the CA in `directory`, with `name` as
    its DNS name and usable as server and client; returns (certificate, key)."""
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{name}\n"
                   "basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", DAYS, "-extfile", ext.name,
             cwd=directory)
    (directory / f"{name}.key").chmod(0o600)
    return directory / f"{name}.pem", directory / f"{name}.key"
