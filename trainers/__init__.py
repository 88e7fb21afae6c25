"""Method registry (filled in below)."""
