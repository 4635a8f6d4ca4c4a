"""Points as a stream of fixed-size chunks: an in-memory array or any re-iterable of [n_i, D] arrays
(``EmbeddingShards``), cut into chunks of ``rows`` rows (the last one zero-padded), so the compiled
k-means step sees one shape and a pass can resume at a chunk index."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class PointStream:
    """``points`` with its row count and dimension known up front (one counting pass for a plain iterable)."""

    def __init__(self, points: np.ndarray | Iterable[np.ndarray]):
        if isinstance(points, Iterator):
            raise TypeError("points must be an array or a re-iterable of arrays (k-means makes several passes), "
                            "not a one-shot iterator")
        if hasattr(points, "shape") and hasattr(points, "dtype"):
            self.array = np.asarray(points)
            if self.array.ndim != 2:
                raise ValueError(f"points must be [N, D], got shape {self.array.shape}")
            self.source = None
            self.num_rows, self.dim = self.array.shape
        else:
            self.array, self.source = None, points
            num_rows, dim = getattr(points, "num_rows", None), getattr(points, "dim", None)
            if num_rows is None or dim is None:
                num_rows, dim = 0, None
                for part in points:
                    part = np.asarray(part)
                    if part.ndim != 2 or (dim is not None and part.shape[1] != dim):
                        raise ValueError(f"every shard must be [n, D] with one D; got {part.shape} after D={dim}")
                    num_rows, dim = num_rows + part.shape[0], part.shape[1]
            self.num_rows, self.dim = int(num_rows), int(dim or 0)
        if self.num_rows == 0:
            raise ValueError("points is empty")

    def num_chunks(self, rows: int) -> int:
        return -(-self.num_rows // rows)

    def _parts(self) -> Iterator[np.ndarray]:
        if self.array is not None:
            yield self.array
        else:
            for part in self.source:
                yield np.asarray(part)

    def chunks(self, rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray, int]]:
        """(chunk index, float32 [rows, D] zero-padded, number of real rows) from chunk ``start`` on."""
        if self.array is not None:
            for c in range(start, self.num_chunks(rows)):
                block = self.array[c * rows:(c + 1) * rows]
                yield c, _padded(block, rows), block.shape[0]
            return
        buffer, filled, c, skip = np.zeros((rows, self.dim), np.float32), 0, 0, start * rows
        for part in self._parts():
            if skip >= part.shape[0]:
                skip -= part.shape[0]
                continue
            part, skip = part[skip:], 0
            while part.shape[0]:
                take = min(rows - filled, part.shape[0])
                buffer[filled:filled + take] = part[:take]
                filled, part = filled + take, part[take:]
                if filled == rows:
                    yield start + c, buffer.copy(), rows
                    c, filled = c + 1, 0
        if filled:
            buffer[filled:] = 0
            yield start + c, buffer.copy(), filled

    def rows_at(self, indices: np.ndarray) -> np.ndarray:
        """float32 rows at sorted-or-not global ``indices`` (one pass over a streamed source)."""
        indices = np.asarray(indices, np.int64)
        if self.array is not None:
            return np.asarray(self.array[indices], np.float32)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.dim), np.float32)
        lo, pos = 0, 0
        for part in self._parts():
            hi = lo + part.shape[0]
            while pos < len(order) and indices[order[pos]] < hi:
                out[order[pos]] = part[indices[order[pos]] - lo]
                pos += 1
            lo = hi
        return out

    def materialise(self) -> np.ndarray:
        """All rows as one float32 [N, D] array."""
        return np.asarray(self.array if self.array is not None else np.concatenate(list(self._parts())), np.float32)


def _padded(block: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, block.shape[1]), np.float32)
    out[:block.shape[0]] = block
    return out
