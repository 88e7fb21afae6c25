"""Dataset loading and formatting per task type (filled in below)."""
