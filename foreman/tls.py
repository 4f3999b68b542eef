"""TLS for ``wss://``: the foreman's server context, the worker's client context, certificate fingerprints.

Standard library only: the worker imports it too.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
FINGERPRINT_HELP = "python -m foreman --print-fingerprint CERT prints it"


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context for ``certfile`` (PEM, server certificate first), with its key in ``keyfile``
    or, if that is None, in ``certfile`` itself. ValueError saying what to fix if they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as exc:  # ssl.SSLError is an OSError too
        key = f" with key {keyfile}" if keyfile else " (no --keyfile: the key must be in the same file)"
        raise ValueError(f"cannot load the TLS certificate {certfile}{key}: {exc}; --certfile takes a PEM "
                         "certificate (chain) and --keyfile its private key") from exc
    return context


def client_context(cafile: str | None, pinned: bool) -> ssl.SSLContext:
    """A TLS 1.2+ client context: verify against ``cafile`` (else the system's CA store), hostname included.
    ``pinned`` without ``cafile``: no CA verification at all, the caller compares the certificate's fingerprint
    (:func:`fingerprint`) instead, before sending anything."""
    if pinned and cafile is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER-encoded certificate."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def certificate_fingerprint(path: str | Path) -> str:
    """The fingerprint of the first certificate in a PEM file: the one a server presents."""
    match = _PEM_CERT.search(Path(path).read_text())
    if match is None:
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return fingerprint(ssl.PEM_cert_to_DER_cert(match.group()))


def parse_fingerprint(text: str) -> str:
    """Normalise ``sha256:HEX`` to lower case without colons; also accepts openssl's ``AB:CD:...`` output
    (``openssl x509 -noout -fingerprint -sha256 -in CERT``)."""
    value = text.strip().lower()
    value = re.sub(r"^sha256( fingerprint=|:)", "", value).replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"not a SHA-256 certificate fingerprint: {text!r}; expected sha256: and 64 hex digits "
                         f"({FINGERPRINT_HELP})")
    return "sha256:" + value
