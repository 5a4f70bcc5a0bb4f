"""Study scripts (see each module docstring)."""
