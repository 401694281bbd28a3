"""Provenance: a C2PA manifest on every image the guard judged, and reading it back.

    Marker(config).mark(bytes, Facts)   the image with its signed manifest (guard.provenance.marker)
    read_image(bytes, trust_pem)        verify a manifest as a recipient does (`safeedit verify-image`)
    load_credentials(config.c2pa)       the operator's certificate chain and key, else a
                                        development chain made at first start (untrusted)

C2PA is the standard OpenAI, Adobe and Google embed; the manifest binds the image's bytes to the
guard's decision (trace id, policy, rounds) and to the audit log's id, signed with a certificate.
Built on `c2pa-python` and `cryptography`: no cryptography of our own.
"""

from guard.provenance.credentials import Credentials, dev_chain, load_credentials
from guard.provenance.marker import GUARD_LABEL, TRAINED_ALGORITHMIC_MEDIA, Facts, Marker
from guard.provenance.reading import Reading, read_image

__all__ = ["GUARD_LABEL", "TRAINED_ALGORITHMIC_MEDIA", "Credentials", "Facts", "Marker",
           "Reading", "dev_chain", "load_credentials", "read_image"]
