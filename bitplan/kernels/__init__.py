"""Low-bit matmul / attention kernels behind the packed modules: torch CPU ops and Triton (issue: kernels)."""
