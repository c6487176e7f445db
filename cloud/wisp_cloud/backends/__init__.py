"""Verifier backends."""
