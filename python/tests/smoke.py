"""CI smoke test of the built wheel (no GPU there): the package imports, bad specs are ValueErrors naming the
problem, and without a GPU (or NVRTC) loading a layout is a RuntimeError that says why."""
import sys

import kivi

# The default build loads CUDA 13 (libnvrtc.so.13).
assert kivi.CUDA_MAJOR == 13, kivi.CUDA_MAJOR

try:
    kivi.Module("kivi-2, residual_lenght: 64")
    sys.exit("a misspelt field was accepted")
except ValueError as e:
    assert "residual_lenght" in str(e), e

try:
    kivi.Module("kivi-2, llama-3-8b")
    print("a GPU answered: run python/tests/gpu_check.py there")
except RuntimeError as e:
    msg = str(e)
    assert "driver" in msg or "libnvrtc" in msg or "GPU" in msg, msg
    print("no GPU, as expected here:", msg.splitlines()[0])
print("kivi wheel smoke test passed")
