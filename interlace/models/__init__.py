"""Small self-contained reference models used by tests and the default benchmark."""
