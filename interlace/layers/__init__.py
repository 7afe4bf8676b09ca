"""Drop-in tensor-parallel nn.Modules and parallelize()."""
