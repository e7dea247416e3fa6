"""TLS for amqps://: which broker certificates to trust, and the client certificate to show.

For example::

    tls = ClientTls.load(ca_file="ca.pem", cert_file="pump.pem", key_file="pump.key")
    creator = tls.creator("rabbit.example.org")   # for wrapClientTLS
    tls.user                                      # the certificate's CN ("pump"), or None

The broker's certificate and host name are always verified (service_identity), against the
certificates of C{ca_file} when given, else the system's trust store. C{cert_file} holds the
client certificate in PEM, optionally followed by the intermediate CA certificates between it
and the CA the broker trusts; C{key_file} holds its private key, PEM and unencrypted, and must
be private to its owner (mode 0600) like the credentials file. The files are read once, by
C{load}; every problem with them is a ValueError of one line naming the file.

pyOpenSSL and cryptography are imported by L{ClientTls.load} (see L{ion.core.lazytls}): a
process on amqp:// never loads them.
"""

import datetime
import re
import sys

import attrs

from ion.core import lazytls
from ion.core.credentials import read_private_file

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TlsFileError(ValueError):
    """A CA, certificate or key file that cannot be used; the message names the file."""


@attrs.define(eq=False)
class ClientTls:
    """What an amqps:// connection trusts and presents. Make one with L{load}."""

    _trust_root: object = None
    _certificate: object = None  # a twisted PrivateCertificate, or None
    _chain: list = attrs.Factory(list)
    user: str | None = None

    @property
    def has_certificate(self):
        """Whether a client certificate is shown (and so EXTERNAL authentication is possible)."""
        return self._certificate is not None

    @classmethod
    def load(cls, ca_file=None, cert_file=None, key_file=None):
        """Read and check the files; None leaves a part out. A client certificate needs its key
        and the key its certificate.

        @raise TlsFileError: a file is missing or unreadable, holds no (or a bad) PEM
            certificate or key, the key is encrypted or does not belong to the certificate,
            or the certificate has expired.
        @raise ValueError: the key file is open to group or others (the message gives the
            chmod that fixes it), as for the credentials file.
        """
        lazytls.load()
        from cryptography.x509.oid import NameOID
        from OpenSSL import crypto
        from twisted.internet import ssl

        if (cert_file is None) != (key_file is None):
            raise TlsFileError(
                "a broker client certificate needs its key and a key its certificate: give "
                "both (--broker-cert and --broker-key)"
            )
        trust_root = None
        if ca_file is not None:
            authorities = _certificates(_read(ca_file, "broker CA file"), "broker CA file", ca_file)
            trust_root = ssl.trustRootFromCertificates([_twisted(c) for c in authorities])
        if cert_file is None:
            return cls(trust_root)
        what = "broker certificate file"
        own, *chain = _certificates(_read(cert_file, what), what, cert_file)
        expiry = own.not_valid_after_utc
        if expiry < datetime.datetime.now(datetime.timezone.utc):
            raise TlsFileError(f"{what} {cert_file}: the certificate expired on {expiry:%Y-%m-%d}")
        key = _private_key(key_file)
        if _public_bytes(own.public_key()) != _public_bytes(key.public_key()):
            raise TlsFileError(
                f"broker key file {key_file} is not the key of the certificate in {cert_file}"
            )
        certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            _twisted(own), ssl.KeyPair(crypto.PKey.from_cryptography_key(key))
        )
        names = own.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        user = names[0].value if names else None
        return cls(trust_root, certificate, [_twisted(c).original for c in chain], user)

    def creator(self, host):
        """The client connection creator for a broker at C{host} (wrapClientTLS's first
        argument): verifies the broker's certificate and that it names C{host}."""
        from twisted.internet import ssl

        extra = {"extraCertChain": self._chain} if self._chain else None
        return ssl.optionsForClientTLS(
            host,
            trustRoot=self._trust_root,
            clientCertificate=self._certificate,
            extraCertificateOptions=extra,
        )


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsFileError(f"cannot read {what} {path}: {e.strerror}") from None


def _certificates(data, what, path):
    """The certificates of the PEM blocks in C{data}, in file order (other blocks, a key for
    instance, are skipped)."""
    from cryptography import x509

    blocks = _CERTIFICATE.findall(data)
    if not blocks:
        raise TlsFileError(f"{what} {path} holds no PEM certificate")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise TlsFileError(f"{what} {path}: certificate {number} is not valid PEM") from None
    return certificates


def _private_key(path):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read_private_file(path, "broker key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying it needs a password
        raise TlsFileError(
            f"broker key file {path} is encrypted; give the key without a passphrase "
            "(the file is private to its owner instead)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError(f"broker key file {path} holds no PEM private key") from None
    return key


def _public_bytes(public_key):
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _twisted(certificate):
    from OpenSSL import crypto
    from twisted.internet import ssl

    return ssl.Certificate(crypto.X509.from_cryptography(certificate))


# OpenSSL's reasons for a failed handshake, as the broker's alert or our own check gives them.
_REFUSED_CERTIFICATE = (
    "alert bad certificate",
    "alert unknown ca",
    "alert certificate unknown",
    "alert certificate expired",
    "alert certificate revoked",
    "alert unsupported certificate",
    "alert access denied",
)


def describe_failure(error):
    """One line saying why a TLS handshake failed, for an exception that ended the
    connection; None when C{error} is not about TLS."""
    if "OpenSSL.SSL" not in sys.modules:
        return None  # no TLS connection was made: TLS support was never loaded
    from OpenSSL import SSL
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        names = []
        for mismatch in error.errors:
            wanted = getattr(mismatch, "mismatched_id", None)
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            if isinstance(name, bytes):
                name = name.decode("ascii", "replace")
            if name is not None:
                names.append(str(name))
        host = " or ".join(names) or "the host connected to"
        return f"TLS: the broker's certificate is not for {host}"
    if not isinstance(error, SSL.Error):
        return None
    reasons = [
        entry[2]
        for entry in (error.args[0] if error.args else ())
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
    ]
    reason = "; ".join(reasons) or str(error)
    if "certificate verify failed" in reason:
        return (
            f"TLS: the broker's certificate is not verified ({reason}: not signed by a "
            "trusted CA, or expired); --broker-ca names the CA file to trust"
        )
    if "alert certificate required" in reason:
        return (
            f"TLS: the broker asks for a client certificate ({reason}): give --broker-cert "
            "and --broker-key"
        )
    if any(alert in reason for alert in _REFUSED_CERTIFICATE):
        return f"TLS: the broker refused the client certificate ({reason})"
    return f"TLS handshake failed ({reason})"
