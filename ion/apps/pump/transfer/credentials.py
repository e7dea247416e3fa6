"""The credentials file of the pump's transfers: the one ION credentials file.

The reader lives in L{ion.core.credentials} (format, permission checks, lookup): the
container finds its broker password there and the pump its server logins, in the same file.
This module keeps the names the transfer code imports.
"""

from ion.core.credentials import (
    OPTIONS,
    Credential,
    Credentials,
    CredentialsError,
    url_parts,
)

__all__ = ["OPTIONS", "Credential", "Credentials", "CredentialsError", "url_parts"]
