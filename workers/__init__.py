"""Workers: one per GPU, owning the block pools and running the kernels next to the data."""
