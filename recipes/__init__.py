"""Recipes: YAML loading and validation, model loading, the train entry point."""
