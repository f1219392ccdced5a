"""Where the user's code is: the source line every node and error names.

A node remembers the user source line that created it: the innermost stack
frame outside the looplift package and torch (the recipes count as user code:
they are written the way users write models). Every error points there.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_source_line", "is_user_frame"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_RECIPES_DIR = os.path.join(_PACKAGE_DIR, "recipes") + os.sep
# Frames of torch itself (``nn.Module.__call__`` between a user's call and a module) are skipped too.
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _is_internal(filename: str) -> bool:
    if filename.startswith(_RECIPES_DIR):
        return False
    return filename.startswith(_PACKAGE_DIR) or filename.startswith(_TORCH_DIR)


def is_user_frame(frame) -> bool:
    """Whether the stack frame `frame` runs user code (outside looplift and torch)."""
    filename = frame.f_code.co_filename
    return not _is_internal(filename if filename.startswith("/") else os.path.abspath(filename))


def user_source_line() -> str:
    """``file:line`` of the innermost stack frame of user code (outside looplift and torch)."""
    frame = sys._getframe(1)
    while frame is not None:
        if is_user_frame(frame):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<looplift internal>"
