"""medxfer: trustworthy medical image classifiers from small, imbalanced datasets."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
