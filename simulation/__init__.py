"""Orchestration and the user-facing `hybridfl` command."""
