"""The MACE trunk: building it from hypers or files, its backends (e3nn,
cuEquivariance) and dtype rules, charge/spin conditioning, the graph it reads, and
running it to per-layer node features."""
