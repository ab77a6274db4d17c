"""The server tests use the inference tests' tiny model."""

from tests.inference.conftest import serve_model  # noqa: F401  (a fixture)
