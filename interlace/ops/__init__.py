"""Launch wrappers: check constraints, allocate outputs, launch kernels with META-derived grids."""
