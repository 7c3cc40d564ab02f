"""Recurrent policies: each episode's state, kept by the server between its steps (DESIGN.md §13)."""
