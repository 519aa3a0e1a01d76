"""LightGBM binary-classifier prediction as one compiled loop, with exactly LightGBM's results.

`booster.predict` costs ~10 us a row for the 200-tree model, ~20 % of the scorer's batch
step: per row LightGBM builds a sparse (index, value) vector, copies it into a dense
buffer and walks each tree through generic decision code. `TreeKernel` walks the same
trees, flattened into numpy arrays, in one numba loop over the batch. It reproduces
LightGBM's arithmetic step for step (the C++ is include/LightGBM/tree.h, gbdt_prediction.cpp,
binary_objective.hpp):

- inputs with |v| <= kZeroThreshold (1e-35f) are read as 0.0 (LightGBM drops them from
  the sparse row, so the dense buffer keeps its 0.0);
- numerical node: NaN becomes 0.0 unless the node's missing type is NaN; missing type
  Zero (|v| <= kZeroThreshold) or NaN (v is NaN) take the default side; else v <= threshold
  goes left;
- categorical node: v truncated to a C int (NaN and values outside int32 go right, as
  x86's cvttsd2si gives INT_MIN there); negative goes right; else left iff the category
  is in the node's set;
- the raw score adds the trees' leaf values in tree order from 0.0, then the binary
  objective's 1 / (1 + exp(-sigmoid * raw)) with the same libm exp.

Models it does not cover (other objectives, multiclass, linear trees, ...) get no kernel
(`TreeKernel.for_booster` returns None) and are served by LightGBM. A kernel is built only
if it also gives bit-identical predictions to the booster on a probe batch (typical,
boundary, zero, negative and NaN values of every split); LightGBM stays the reference.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold, a float literal widened to double
_MISSING_NONE, _MISSING_ZERO, _MISSING_NAN = 0, 1, 2
_MISSING_TYPES = {"None": _MISSING_NONE, "Zero": _MISSING_ZERO, "NaN": _MISSING_NAN}
_PROBE_ROWS = 2000


@njit(cache=True, nogil=True)
def _predict(matrix, feature, threshold, kind, default_left, missing, left, right, cat_start, cat_end,
             cat_bits, leaf_value, tree_root, sigmoid, out):
    """One score per row of `matrix` (float64, C order) into `out`; see the module docstring for each step.

    Tree by tree over all rows (a tree's nodes stay in cache); each row still adds its trees' leaf values
    in tree order, so the sums are LightGBM's."""
    n_rows, n_cols = matrix.shape
    rows = np.empty((n_rows, n_cols), dtype=np.float64)
    for r in range(n_rows):
        for c in range(n_cols):
            value = matrix[r, c]
            rows[r, c] = 0.0 if abs(value) <= ZERO_THRESHOLD else value  # NaN compares False: kept
    raw = np.zeros(n_rows, dtype=np.float64)
    for t in range(len(tree_root)):
        root = tree_root[t]
        for r in range(n_rows):
            node = root
            while node >= 0:
                value = rows[r, feature[node]]
                if kind[node] == 0:  # numerical
                    m = missing[node]
                    if value != value and m != 2:
                        value = 0.0
                    if (m == 1 and -ZERO_THRESHOLD <= value <= ZERO_THRESHOLD) or (m == 2 and value != value):
                        node = left[node] if default_left[node] else right[node]
                    elif value <= threshold[node]:
                        node = left[node]
                    else:
                        node = right[node]
                else:  # categorical
                    if not (-2147483649.0 < value < 2147483648.0):  # NaN or outside int32
                        node = right[node]
                        continue
                    category = int(value)  # truncates toward zero, like static_cast<int>
                    word = cat_start[node] + category // 32
                    if category >= 0 and word < cat_end[node] and (cat_bits[word] >> (category % 32)) & 1:
                        node = left[node]
                    else:
                        node = right[node]
            raw[r] += leaf_value[~node]
    for r in range(n_rows):
        out[r] = 1.0 / (1.0 + math.exp(-sigmoid * raw[r]))


class _Unsupported(Exception):
    """The model uses something the kernel does not reproduce; LightGBM serves it."""


class TreeKernel:
    """Flat arrays of a binary LightGBM model and the compiled loop that predicts with them."""

    def __init__(self, model: dict):
        self.n_features = model["max_feature_idx"] + 1
        self.sigmoid = _binary_sigmoid(model)
        nodes: dict[str, list] = {name: [] for name in (
            "feature", "threshold", "kind", "default_left", "missing", "left", "right", "cat_start", "cat_end")}
        self._cat_bits: list[int] = []
        self._leaf_values: list[float] = []
        roots = []
        for tree in model["tree_info"]:
            if tree.get("is_linear"):
                raise _Unsupported("linear trees")
            roots.append(self._add(tree["tree_structure"], nodes))
        self.arrays = (
            np.array(nodes["feature"], dtype=np.int64), np.array(nodes["threshold"], dtype=np.float64),
            np.array(nodes["kind"], dtype=np.int8), np.array(nodes["default_left"], dtype=np.bool_),
            np.array(nodes["missing"], dtype=np.int8), np.array(nodes["left"], dtype=np.int64),
            np.array(nodes["right"], dtype=np.int64), np.array(nodes["cat_start"], dtype=np.int64),
            np.array(nodes["cat_end"], dtype=np.int64), np.array(self._cat_bits or [0], dtype=np.uint32),
            np.array(self._leaf_values, dtype=np.float64), np.array(roots, dtype=np.int64),
        )

    def _add(self, node: dict, nodes: dict[str, list]) -> int:
        """Append `node` (and its subtree) to the flat arrays; its index, or ~leaf index for a leaf."""
        if "leaf_value" in node:
            self._leaf_values.append(float(node["leaf_value"]))
            return ~(len(self._leaf_values) - 1)
        index = len(nodes["feature"])
        for values in nodes.values():
            values.append(0)
        nodes["feature"][index] = node["split_feature"]
        nodes["default_left"][index] = bool(node["default_left"])
        nodes["missing"][index] = _MISSING_TYPES[node["missing_type"]]
        if node["decision_type"] == "<=":
            nodes["threshold"][index] = float(node["threshold"])
        elif node["decision_type"] == "==":
            nodes["kind"][index] = 1
            nodes["cat_start"][index], nodes["cat_end"][index] = self._add_categories(node["threshold"])
        else:
            raise _Unsupported(f"decision type {node['decision_type']!r}")
        nodes["left"][index] = self._add(node["left_child"], nodes)
        nodes["right"][index] = self._add(node["right_child"], nodes)
        return index

    def _add_categories(self, threshold: str) -> tuple[int, int]:
        """The node's categories ("1||4||7") as a bitset appended to cat_bits: its [start, end) words."""
        categories = [int(c) for c in str(threshold).split("||")]
        if min(categories) < 0:
            raise _Unsupported("negative category")
        words = [0] * (max(categories) // 32 + 1)
        for category in categories:
            words[category // 32] |= 1 << (category % 32)
        start = len(self._cat_bits)
        self._cat_bits.extend(words)
        return start, len(self._cat_bits)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        matrix = np.ascontiguousarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self.n_features:
            raise ValueError(f"expected a (n, {self.n_features}) matrix, got shape {matrix.shape}")
        out = np.empty(len(matrix), dtype=np.float64)
        _predict(matrix, *self.arrays, self.sigmoid, out)
        return out

    @classmethod
    def for_booster(cls, booster) -> TreeKernel | None:
        """A kernel giving exactly booster.predict's results, or None (unsupported model, or a probe differs)."""
        try:
            kernel = cls(booster.dump_model())
        except (_Unsupported, KeyError, TypeError, ValueError):
            return None
        probe = kernel.probe_matrix()
        if not np.array_equal(kernel.predict(probe), booster.predict(probe, num_threads=1), equal_nan=True):
            return None
        return kernel

    def probe_matrix(self, rows: int = _PROBE_ROWS, seed: int = 0) -> np.ndarray:
        """Rows mixing every split threshold, its neighbours, zeros (+-0, +-1e-36), negatives, NaN and the
        categories (and non-integral, negative, huge values) of every categorical split."""
        feature, threshold, kind = self.arrays[0], self.arrays[1], self.arrays[2]
        candidates: list[list[float]] = [[0.0, -0.0, 1e-36, -1e-36, math.nan, -1.0, 1.0, 1e300, -1e300, 0.5, -0.5]
                                         for _ in range(self.n_features)]
        bits, starts, ends = self.arrays[9], self.arrays[7], self.arrays[8]
        for node in range(len(feature)):
            values = candidates[feature[node]]
            if kind[node] == 0:
                t = float(threshold[node])
                values += [t, np.nextafter(t, math.inf), np.nextafter(t, -math.inf)]
            else:
                for word in range(starts[node], ends[node]):
                    for bit in range(32):
                        if bits[word] >> bit & 1:
                            category = (word - starts[node]) * 32 + bit
                            values += [float(category), category + 0.5, category + 1.0]
        rng = np.random.default_rng(seed)
        columns = [rng.choice(np.array(values, dtype=np.float64), size=rows) for values in candidates]
        return np.ascontiguousarray(np.column_stack(columns))


def _binary_sigmoid(model: dict) -> float:
    """The sigmoid parameter of a single-output binary model (objective 'binary sigmoid:1'), else unsupported."""
    if model.get("average_output"):
        raise _Unsupported("averaged output (random forest)")
    if model.get("num_class", 1) != 1 or model.get("num_tree_per_iteration", 1) != 1:
        raise _Unsupported("more than one output")
    objective = str(model.get("objective", "")).split()
    if not objective or objective[0] != "binary":
        raise _Unsupported(f"objective {model.get('objective')!r}")
    for part in objective[1:]:
        if part.startswith("sigmoid:"):
            return float(part.split(":", 1)[1])
    raise _Unsupported("binary objective without a sigmoid")
