"""Triton kernels of fasthist, installed as ``fasthist.kernels``.

Importing this package needs Triton; ``fasthist.backend`` treats an ImportError as
"no kernels here" and uses the pure-PyTorch reference.
"""

import triton  # noqa: F401
