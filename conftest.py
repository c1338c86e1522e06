# Triton reads TRITON_INTERPRET when a kernel module is imported, so it must be set
# before any test module imports kernels/. CUDA runs override it with TRITON_INTERPRET=0.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The engine before torch: engine/config.py sets OpenMP's passive wait (unless the environment
# says otherwise) before torch loads libgomp, so tests run the engine as users do; with libgomp's
# spinning, a test process beside a busy server subprocess took ~1 s per decode step.
import engine  # noqa: E402,F401
