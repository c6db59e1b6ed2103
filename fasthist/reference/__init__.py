"""Pure-PyTorch reference backend: the CPU path and the oracle of the kernel tests."""
