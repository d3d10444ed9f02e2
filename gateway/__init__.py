"""evlu-gateway: an iSCSI target gateway serving encrypted virtual LUNs."""

__version__ = "0.1.0"
