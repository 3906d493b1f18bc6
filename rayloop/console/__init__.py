"""The web console (read-only, served by the cluster): see :mod:`rayloop.console.app`."""
