"""Soak test for AnyCable-compatible servers (``scripts/soak``; see README.rst, "Soak testing")."""
