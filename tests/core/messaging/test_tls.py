"""Tests for the amqps:// TLS files (CA, client certificate, key): what an operator gets wrong
is refused before any connection, in one line naming the file. Connections are tested on the
private RabbitMQ nodes in test_amqp.py."""

import os

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.trial import unittest

from ion.core.messaging.tls import ClientTls, TlsFileError, describe_failure
from tests.broker import issue_certificate, make_certificates, new_key, write_pem


class LoadTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        make_certificates(self.dir, "tess")

    def path(self, name):
        return os.path.join(self.dir, name)

    def refused(self, error=TlsFileError, **files):
        """Load expecting a refusal: returns its message, checked to be one line."""
        e = self.assertRaises(error, ClientTls.load, **files)
        self.assertNotIn("\n", str(e))
        return str(e)

    def test_ca_only(self):
        """A CA file alone: the broker is checked against it, no client certificate is shown
        (so the login stays PLAIN)."""
        tls = ClientTls.load(ca_file=self.path("ca.pem"))
        self.assertFalse(tls.has_certificate)
        self.assertIsNone(tls.user)
        self.assertFalse(ClientTls.load().has_certificate)

    def test_client_certificate(self):
        """A certificate and its key: shown to the broker, whose user is the CN."""
        tls = ClientTls.load(
            self.path("ca.pem"), self.path("client.pem"), self.path("client.key")
        )
        self.assertTrue(tls.has_certificate)
        self.assertEqual(tls.user, "tess")

    def test_certificate_with_its_chain(self):
        """A certificate file may carry the intermediate CAs after the certificate, which is
        the first one (test_amqp shows a broker accepting it)."""
        root_key, middle_key, key = new_key(), new_key(), new_key()
        root = issue_certificate("Root", root_key, ca=True)
        middle = issue_certificate("Middle", middle_key, root, root_key, ca=True)
        own = issue_certificate("chained", key, middle, middle_key)
        cert = write_pem(self.path("chain.pem"), [own, middle])
        tls = ClientTls.load(None, cert, write_pem(self.path("chained.key"), key=key))
        self.assertEqual(tls.user, "chained")

    def test_missing_files(self):
        """A missing file is named, whichever it is."""
        missing = self.path("missing.pem")
        self.assertIn(f"cannot read broker CA file {missing}", self.refused(ca_file=missing))
        line = self.refused(cert_file=missing, key_file=self.path("client.key"))
        self.assertIn(f"cannot read broker certificate file {missing}", line)
        line = self.refused(ValueError, cert_file=self.path("client.pem"), key_file=missing)
        self.assertIn(f"cannot read broker key file {missing}", line)

    def test_not_pem(self):
        """Files without PEM certificates, a damaged certificate, a key file without a key."""
        garbage = self.path("garbage.pem")
        with open(garbage, "wb") as f:
            f.write(b"not a certificate\n")
        os.chmod(garbage, 0o600)
        self.assertIn("holds no PEM certificate", self.refused(ca_file=garbage))
        damaged = self.path("damaged.pem")
        with open(damaged, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertIn(f"broker CA file {damaged}: certificate 1 is not valid PEM",
                      self.refused(ca_file=damaged))
        line = self.refused(cert_file=self.path("client.pem"), key_file=garbage)
        self.assertIn(f"broker key file {garbage} holds no PEM private key", line)
        line = self.refused(cert_file=garbage, key_file=self.path("client.key"))
        self.assertIn(f"broker certificate file {garbage} holds no PEM certificate", line)

    def test_certificate_and_key_go_together(self):
        for files in ({"cert_file": self.path("client.pem")},
                      {"key_file": self.path("client.key")}):
            self.assertIn("--broker-cert and --broker-key", self.refused(**files))

    def test_key_open_to_others(self):
        """A key file group or others may read is refused like the credentials file: the
        line names the file and the chmod that fixes it."""
        key = self.path("client.key")
        for mode in (0o644, 0o640, 0o604):
            os.chmod(key, mode)
            line = self.refused(ValueError, cert_file=self.path("client.pem"), key_file=key)
            self.assertEqual(
                line,
                f"broker key file {key} is open to group or others (mode {mode:04o}); "
                f"make it private with: chmod 600 {key}",
            )
        os.chmod(key, 0o400)
        ClientTls.load(cert_file=self.path("client.pem"), key_file=key)

    def test_key_of_another_certificate(self):
        line = self.refused(cert_file=self.path("client.pem"), key_file=self.path("stranger.key"))
        self.assertIn(f"broker key file {self.path('stranger.key')} is not the key of the "
                      f"certificate in {self.path('client.pem')}", line)

    def test_encrypted_key(self):
        from cryptography.hazmat.primitives import serialization

        key = new_key()
        path = self.path("locked.key")
        write_pem(path)
        with open(path, "wb") as f:
            f.write(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ))
        cert = write_pem(self.path("locked.pem"), [issue_certificate("tess", key)])
        self.assertIn("is encrypted", self.refused(cert_file=cert, key_file=path))

    def test_expired_certificate(self):
        """An expired client certificate is refused here, not by a broker's vague alert."""
        key = new_key()
        cert = write_pem(self.path("old.pem"), [issue_certificate("tess", key, days=0)])
        line = self.refused(cert_file=cert, key_file=write_pem(self.path("old.key"), key=key))
        self.assertIn(f"broker certificate file {cert}: the certificate expired on", line)


class DescribeFailureTests(unittest.SynchronousTestCase):
    def test_descriptions(self):
        """OpenSSL's reasons for a failed handshake become one line saying what to do."""
        cases = [
            ("certificate verify failed", "--broker-ca names the CA file to trust"),
            ("tlsv13 alert certificate required", "give --broker-cert and --broker-key"),
            ("tlsv1 alert unknown ca", "the broker refused the client certificate"),
            ("sslv3 alert handshake failure", "TLS handshake failed"),
        ]
        for reason, expected in cases:
            line = describe_failure(SSL.Error([("SSL routines", "", reason)]))
            self.assertIn(expected, line)
            self.assertIn(reason, line)
        mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("rabbit.example"))])
        self.assertEqual(describe_failure(mismatch),
                         "TLS: the broker's certificate is not for rabbit.example")
        self.assertIsNone(describe_failure(ConnectionResetError()))
