"""A SCRAM-SHA-256 client (RFC 5802, RFC 7677), written from the RFCs with hashlib, hmac,
base64 and secrets: an independent second implementation to check the broker's server
against. No channel binding (GS2 header `n,,`), no authorization identity.

    client = ScramClient("alice", "secret")
    first = client.client_first()                      # to the server
    final = client.client_final(server_first)          # to the server
    client.verify_server_final(server_final)           # raises ScramError if forged

Passwords are used as UTF-8 bytes without SASLprep, which is correct for the ASCII passwords
the tests use (printable ASCII is its own SASLprep).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

GS2_HEADER = b"n,,"
# RFC 7677 section 4: a client SHOULD refuse fewer than 4096 iterations; the upper bound keeps
# a hostile server from making the test spin.
MIN_ITERATIONS, MAX_ITERATIONS = 4096, 10_000_000


class ScramError(Exception):
    """The server's message is malformed or its signature does not verify."""


def saslname(user: str) -> bytes:
    """RFC 5802 section 5.1: `=` and `,` in a user name are escaped as `=3D` and `=2C`."""
    return user.replace("=", "=3D").replace(",", "=2C").encode()


def parse_attributes(message: bytes) -> list[tuple[str, bytes]]:
    """`a=x,b=y` as [("a", b"x"), ("b", b"y")], in order; values may contain `=`."""
    out = []
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not part[:1].isalpha():
            raise ScramError(f"malformed attribute {part!r} in {message!r}")
        out.append((part[:1].decode(), part[2:]))
    return out


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class ScramClient:
    def __init__(self, username: str, password: str, nonce: str | None = None):
        self.username = username
        self.password = password.encode()
        # A printable nonce without ',' (RFC 5802 section 5.1); base64 of random bytes is one.
        self.nonce = (nonce or base64.b64encode(secrets.token_bytes(18)).decode()).encode()
        self.client_first_bare = b"n=" + saslname(username) + b",r=" + self.nonce
        # Filled in by client_final():
        self.server_first: bytes | None = None
        self.server_nonce: bytes | None = None
        self.salt: bytes | None = None
        self.iterations: int | None = None
        self._server_signature: bytes | None = None

    def client_first(self) -> bytes:
        """client-first-message: GS2 header + client-first-message-bare."""
        return GS2_HEADER + self.client_first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """Parses server-first-message (`r=,s=,i=`) and returns client-final-message."""
        attrs = parse_attributes(server_first)
        if [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise ScramError(f"server-first is not r=,s=,i=: {server_first!r}")
        nonce, salt_b64, iterations = (v for _, v in attrs[:3])
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise ScramError(f"server nonce {nonce!r} does not extend ours {self.nonce!r}")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            count = int(iterations.decode())
        except ValueError as e:
            raise ScramError(f"bad salt or iteration count in {server_first!r}") from e
        if not MIN_ITERATIONS <= count <= MAX_ITERATIONS:
            raise ScramError(f"iteration count {count} out of range")
        self.server_first, self.server_nonce, self.salt, self.iterations = (
            server_first, nonce, salt, count)

        # RFC 5802 section 3.
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, count)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = b"c=" + base64.b64encode(GS2_HEADER) + b",r=" + nonce
        auth_message = self.client_first_bare + b"," + server_first + b"," + without_proof
        client_signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature))
        server_key = _hmac(salted, b"Server Key")
        self._server_signature = _hmac(server_key, auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Checks server-final-message (`v=ServerSignature`): proof that the server knows the
        user's ServerKey, not merely that it accepted us."""
        if self._server_signature is None:
            raise ScramError("server-final before server-first")
        attrs = parse_attributes(server_final)
        if attrs and attrs[0][0] == "e":
            raise ScramError(f"server reported error {attrs[0][1]!r}")
        if not attrs or attrs[0][0] != "v":
            raise ScramError(f"server-final is not v=...: {server_final!r}")
        try:
            signature = base64.b64decode(attrs[0][1], validate=True)
        except ValueError as e:
            raise ScramError(f"bad base64 in {server_final!r}") from e
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("server signature does not verify")
