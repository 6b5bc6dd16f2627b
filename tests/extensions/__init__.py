"""Toy extensions defined outside the package, each one file plus a registration (docs/extending.md)."""
