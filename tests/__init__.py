"""bitplan's test suite, a package: its subpackages (tests.kernels, tests.search, ...) must never shadow
installed top-level packages such as Hugging Face's ``kernels``, which transformers imports."""
