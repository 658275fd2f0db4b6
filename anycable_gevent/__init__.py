"""anycable-gevent: an AnyCable-compatible real-time server on gevent."""

__version__ = "0.1.0"
