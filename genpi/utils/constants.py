"""Constants shared by rooms that must not import each other (data, models, losses, the training module)."""

from __future__ import annotations

# The label of a position that no loss trains on (PyTorch's cross-entropy default ignore_index).
IGNORE = -100
