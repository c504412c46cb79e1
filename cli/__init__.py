"""The `vitidle` command line: a thin click shell over the `vitidle` Python API."""
