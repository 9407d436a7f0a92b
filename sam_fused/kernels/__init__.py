"""Triton kernels. Importing this package requires triton; the backends import it lazily."""
