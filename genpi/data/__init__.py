"""Data: records on disk -> token ids and label masks for each loss."""
