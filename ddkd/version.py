"""ddkd's version: a leaf module, so that the package and the files it writes (which record the
version) import it without importing each other."""

__version__ = "0.1.0"
