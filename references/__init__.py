"""Independent reference implementations shared by tests and benchmarks:
PyTorch ports of the official models and losses (``torch_deeplab``,
``torch_agmm_loss``). The library never imports them; tests check the library
against them and benchmarks time them beside it, so neither imports the other.
"""
