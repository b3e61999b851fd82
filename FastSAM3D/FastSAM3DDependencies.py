"""Python packages FastSAM3D needs inside Slicer, installed on first use and only with the user's consent.

Slicer ships numpy, SimpleITK and scipy; the model also needs PyTorch and safetensors. PyTorch is
installed the SlicerPyTorch way when that extension is present (it picks the wheel matching the
computer's CUDA driver); otherwise with ``slicer.util.pip_install`` (the default PyPI wheel: CPU-only on
Windows and macOS, a large CUDA build on Linux). Everything missing is listed in one question, which
says that it may take several minutes; declining raises :class:`DependencyInstallCancelled`.

Slicer is imported inside the functions, so the planning part runs (and is tested) anywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

logger = logging.getLogger(__name__)

MINIMUM_TORCH = "2.1"


@dataclass(frozen=True)
class Requirement:
    """A package the engine imports, how to install it, and why it is needed."""

    module: str
    pip: str
    why: str


REQUIREMENTS = (
    Requirement("torch", f"torch>={MINIMUM_TORCH}", "runs the FastSAM3D model"),
    Requirement("safetensors", "safetensors>=0.4", "reads model weights without unpickling code"),
    Requirement("scipy", "scipy>=1.10", "keeps clicked voxels inside/outside the mask"),
)


class DependencyInstallCancelled(RuntimeError):
    """The user declined to install the packages FastSAM3D needs."""


class DependencyInstallError(RuntimeError):
    """Installing a required package failed (the message says which and what to do)."""


def missingRequirements(find_spec: Callable[[str], object] = importlib.util.find_spec) -> List[Requirement]:
    """The requirements whose module cannot be found (nothing is imported)."""
    return [r for r in REQUIREMENTS if find_spec(r.module) is None]


def pyTorchExtensionLogic():
    """SlicerPyTorch's logic if that extension is installed, else None."""
    try:
        import PyTorchUtils  # noqa: F401  (provided by the SlicerPyTorch extension)
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def installPlan(missing: List[Requirement], havePyTorchExtension: bool) -> List[str]:
    """Human-readable steps for installing ``missing`` (shown in the confirmation's details)."""
    steps = []
    for requirement in missing:
        if requirement.module == "torch":
            how = "with the PyTorch extension (matching this computer's GPU driver)" if havePyTorchExtension \
                else "with pip (install the PyTorch extension first to get a GPU build matching your driver)"
            steps.append(f"PyTorch ({requirement.pip}) {how}: {requirement.why}")
        else:
            steps.append(f"{requirement.pip} with pip: {requirement.why}")
    return steps


def ensureDependencies(confirm: bool = True, log: Optional[Callable[[str], None]] = None) -> bool:
    """Install what is missing after asking once; True if something was installed.

    Raises DependencyInstallCancelled if the user declines, DependencyInstallError if an install fails.
    """
    import slicer

    log = log or logger.info
    missing = missingRequirements()
    if not missing:
        return False
    torchLogic = pyTorchExtensionLogic() if any(r.module == "torch" for r in missing) else None
    steps = installPlan(missing, torchLogic is not None)
    if confirm and not slicer.util.confirmOkCancelDisplay(
        "FastSAM3D needs additional Python packages. Installing them needs a network connection and may take "
        "several minutes. Click OK to install them now.",
        "FastSAM3D: install Python packages",
        detailedText="\n".join(steps),
    ):
        raise DependencyInstallCancelled(
            "FastSAM3D cannot run without: " + ", ".join(r.pip for r in missing) + ". Nothing was installed."
        )
    for requirement in missing:
        log(f"Installing {requirement.pip} (this may take several minutes)...")
        if requirement.module == "torch" and torchLogic is not None:
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}")
            if torch is None:
                raise DependencyInstallError(
                    "PyTorch could not be installed by the PyTorch extension; open the 'PyTorch Utils' module to "
                    "install it manually, then try again."
                )
        else:
            try:
                slicer.util.pip_install(requirement.pip)
            except Exception as error:  # pip's own message is the useful part
                raise DependencyInstallError(f"installing {requirement.pip} failed: {error}") from error
    importlib.invalidate_caches()
    still = missingRequirements()
    if still:
        raise DependencyInstallError(
            "installed, but still not importable: " + ", ".join(r.module for r in still) + ". Restart Slicer and try again."
        )
    log("Python packages installed.")
    return True
