"""Importing fasthist, its integrations package or the framework-free integration modules
imports no training framework: each framework is imported when its integration is used."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "wandb", "accelerate")


def test_no_framework_is_imported():
    code = (
        "import sys, fasthist, fasthist.integrations\n"
        "import fasthist.integrations.metrics, fasthist.integrations.callbacks\n"
        "import fasthist.integrations.tensorboard, fasthist.integrations.wandb\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
