"""fopro-kd: federated Fourier-prompted effective knowledge distillation for long-tailed medical images."""

import os

# OpenMP threads that spin at every barrier made a 2-thread CPU step 5-9x slower on a
# shared machine (docs/performance.md); only effective when set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
