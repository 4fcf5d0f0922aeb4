"""The toolkit's version, in one place: the package metadata (pyproject.toml) reads it from here.

Modules import it from here, never from the package root, so reading the version pulls in
nothing else (no import of `ticketguard/__init__.py` and what it imports).
"""

__version__ = "0.2.0"
