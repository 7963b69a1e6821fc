"""pytorch-fid, the FID reference, importable next to diffusers.

pytorch-fid builds its Inception from torchvision's layers. The only torchvision wheels
here are CUDA builds, whose compiled ops cannot load against the CPU torch, and a
torchvision that fails to import breaks diffusers too. So CI installs both into a
private folder (`pip install --no-deps --target .fid_reference torchvision==0.28.0
pytorch-fid==0.3.0`), and this module puts that folder on the path with torchvision's
meta-kernel registrations (the compiled detection ops, which Inception never calls)
left out. Everything pytorch-fid itself computes runs as published.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

FOLDER = Path(os.environ.get("RECTFLOW_FID_REFERENCE", Path(__file__).resolve().parents[1] / ".fid_reference"))
INSTALL = "pip install --no-deps --upgrade --target .fid_reference torchvision==0.28.0 pytorch-fid==0.3.0"


def import_pytorch_fid():
    """(pytorch_fid.inception, pytorch_fid.fid_score); skips the test when the folder is missing."""
    if not (FOLDER / "pytorch_fid").is_dir():
        pytest.skip(f"pytorch-fid reference not installed: {INSTALL}")
    if str(FOLDER) not in sys.path:
        sys.path.append(str(FOLDER))
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from pytorch_fid import fid_score, inception

    return inception, fid_score
