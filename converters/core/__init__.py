"""The core layer: the neutral tree, byte sources, dtype names and sizes, the manifest, errors,
atomic output, the writer primitive, the format contract and its registry. Imports nothing above it."""
