"""ddkd's files: versioned HDF5 schemas (experts, synthetic sets, weights), the run directory,
and atomic writes. The stages meet only through what this package reads and writes."""
