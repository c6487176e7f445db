"""WISP model fetching and draft export."""
