"""Content-addressed firmware blobs, signed expiring download links and the HTTPS download endpoint.

This package knows nothing of MQTT, devices' tasks or jobs: a link is bound to an opaque resource id and
an opaque subject, and "may this subject download this resource" is a question it asks its caller.
"""

from firmware_store.links import LinkSigner
from firmware_store.slots import DownloadSlots
from firmware_store.store import Blob, BlobTooLarge, FirmwareStore

__all__ = ["Blob", "BlobTooLarge", "DownloadSlots", "FirmwareStore", "LinkSigner"]
