"""FFT product of the circulant and Toeplitz layers: naive.py (PyTorch reference), kernels.py (Triton
around cuFFT), op.py (torch.library ops with a frequency-domain backward, path choice)."""

from .op import fft_conv, fft_precision, force_mode

__all__ = ["fft_conv", "fft_precision", "force_mode"]
