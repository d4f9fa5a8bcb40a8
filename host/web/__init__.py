"""The demo page served at ``/`` and ``/demo`` (package data, loaded by :mod:`host.static`)."""
