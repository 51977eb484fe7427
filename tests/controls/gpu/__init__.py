"""Real GPU kernels as positive controls (issue 26): each module here is a driver that runs one
kernel family over every rank of a ``dispatch_ffn_combine`` call on one device, as
``impl(problem)`` through :func:`oracle.adapters.torch_io.implementation`.
``test_gpu_controls.py`` gates them; it skips without CUDA (and, for vLLM's kernel, without its
carried source)."""
