"""Custom GPU kernels. Importing this package never requires Triton; calling a kernel without it raises."""

from flava_ds.kernels.flash_attention import flash_attention, triton_available

__all__ = ["flash_attention", "triton_available"]
