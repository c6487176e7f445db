"""WISP cloud verifier service."""
