"""The bottom layer: errors, files (atomic writes, names), object storage, process helpers."""
