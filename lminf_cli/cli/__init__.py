"""The `lminf` command line (entry point: app.run); a thin layer over the Python API."""
