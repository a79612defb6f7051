"""bitplan."""
