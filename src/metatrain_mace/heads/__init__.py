"""Heads on the MACE node features, one per target (MLPs for invariant targets,
equivariant linear maps, tensor products and couplings for the others, copies of
MACE's readouts), which targets they can reach, and the TensorMaps they fill."""
