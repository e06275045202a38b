"""Persistent state of the live services: projects, exemplar sets, model versions and session ledgers."""
