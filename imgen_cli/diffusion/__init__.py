"""Continuous-time Gaussian diffusion shared by the continuous families (Bit Diffusion, DiffiT)."""
