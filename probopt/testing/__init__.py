"""Test helpers shipped with probopt (reference implementations, shared test tables)."""
