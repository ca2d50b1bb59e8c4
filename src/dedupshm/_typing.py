"""Type aliases shared by the annotations (no runtime behaviour)."""
import sys
from typing import TYPE_CHECKING

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
elif TYPE_CHECKING:
    from typing_extensions import Buffer
else:                                   # annotations only: any object with the buffer protocol
    Buffer = object

__all__ = ["Buffer"]
