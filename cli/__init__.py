"""The `rateq` command line: parses, calls the library, prints. No logic a Python user would need to copy."""
