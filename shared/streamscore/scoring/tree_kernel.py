"""LightGBM prediction (binary classifier or regression) as one compiled loop, with exactly LightGBM's results.

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
  objective's 1 / (1 + exp(-sigmoid * raw)) with the same libm exp; regression objectives whose
  output is the raw score (regression, regression_l1, huber, fair, quantile) return it as it is.

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
_PLAIN, _CATEGORICAL, _ZERO_MISSING = 0, 1, 2  # node kinds in `kind` (see TreeKernel._node_arrays)
_PROBE_ROWS = 2000
IDENTITY = 0.0  # `sigmoid` of a regression model: the output is the raw score
# regression objectives whose prediction is the raw score (poisson, gamma, tweedie exponentiate it: not covered)
IDENTITY_OBJECTIVES = ("regression", "regression_l1", "huber", "fair", "quantile")


@njit(cache=True, nogil=True)
def _predict(matrix, feature, threshold, kind, left, right, nan_child, cat_start, cat_end, cat_bits, leaf_value,
             tree_root, sigmoid, out):
    """One score per row of `matrix` (float64, C order) into `out`; see the module docstring for each step.

    Tree by tree over all rows (a tree's nodes stay in cache); each row still adds its trees' leaf values
    in tree order, so the sums are LightGBM's. A plain numerical node (feature >= 0) costs one load of the
    value and one comparison: where NaN goes was worked out ahead (`nan_child`); only categorical and
    Zero-missing nodes (feature = ~index) look at their kind."""
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
                f = feature[node]
                if f >= 0:  # plain numerical: missing type None or NaN
                    value = rows[r, f]
                    if value <= threshold[node]:
                        node = left[node]
                    elif value > threshold[node]:
                        node = right[node]
                    else:  # NaN
                        node = nan_child[node]
                    continue
                value = rows[r, ~f]
                if kind[node] == _ZERO_MISSING:  # zero (|v| <= kZeroThreshold, zeroed above) and NaN: default
                    if value == 0.0 or value != value:
                        node = nan_child[node]
                    elif value <= threshold[node]:
                        node = left[node]
                    else:
                        node = right[node]
                    continue
                if not (-2147483649.0 < value < 2147483648.0):  # categorical; NaN or outside int32
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
        out[r] = raw[r] if sigmoid == IDENTITY else 1.0 / (1.0 + math.exp(-sigmoid * raw[r]))


class _Unsupported(Exception):
    """The model uses something the kernel does not reproduce; LightGBM serves it."""


class TreeKernel:
    """Flat arrays of a binary LightGBM model and the compiled loop that predicts with them.

    Built from the model text (`booster.model_to_string()`, ~30 ms for 200 trees), whose arrays are
    LightGBM's own: per tree split_feature, threshold (full precision), decision_type (bit 0
    categorical, bit 1 default left, bits 2-3 missing type), left/right child (~leaf for a leaf),
    leaf_value and, for categorical splits, cat_boundaries / cat_threshold (uint32 bitsets)."""

    def __init__(self, model_text: str):
        header, *trees = model_text.split("\nTree=")
        fields = _key_values(header)
        if "\naverage_output" in header:  # a flag line without "=": random forest, trees are averaged
            raise _Unsupported("averaged output (random forest)")
        self.n_features = int(fields["max_feature_idx"]) + 1
        self.sigmoid = _output_transform(fields)
        trees[-1] = trees[-1].split("\nend of trees", 1)[0]
        columns: dict[str, list[np.ndarray]] = {name: [] for name in (
            "feature", "threshold", "categorical", "default_left", "missing", "left", "right", "cat_start", "cat_end",
            "cat_bits", "leaf_value")}
        roots = []
        n_nodes = n_leaves = n_words = 0
        for text in trees:
            tree = _key_values(text)
            if int(tree.get("is_linear", "0")):
                raise _Unsupported("linear trees")
            leaf_value = _numbers(tree["leaf_value"], np.float64)
            if int(tree["num_leaves"]) == 1:
                roots.append(~n_leaves)
            else:
                roots.append(n_nodes)
                decision = _numbers(tree["decision_type"], np.int64)
                threshold = _numbers(tree["threshold"], np.float64)
                categorical = (decision & 1).astype(bool)
                columns["feature"].append(_numbers(tree["split_feature"], np.int64))
                columns["threshold"].append(threshold)
                columns["categorical"].append(categorical)
                columns["default_left"].append((decision & 2).astype(bool))
                columns["missing"].append(((decision >> 2) & 3).astype(np.int8))
                for side in ("left", "right"):  # internal children after the earlier trees' nodes, leaves after theirs
                    child = _numbers(tree[f"{side}_child"], np.int64)
                    columns[side].append(np.where(child >= 0, child + n_nodes, ~(~child + n_leaves)))
                start = np.zeros(len(decision), dtype=np.int64)
                end = np.zeros(len(decision), dtype=np.int64)
                if categorical.any():
                    bounds = _numbers(tree["cat_boundaries"], np.int64)
                    bits = _numbers(tree["cat_threshold"], np.uint32)
                    index = threshold[categorical].astype(np.int64)  # a categorical threshold is its bitset index
                    start[categorical] = bounds[index] + n_words
                    end[categorical] = bounds[index + 1] + n_words
                    columns["cat_bits"].append(bits)
                    n_words += len(bits)
                columns["cat_start"].append(start)
                columns["cat_end"].append(end)
                n_nodes += len(decision)
            columns["leaf_value"].append(leaf_value)
            n_leaves += len(leaf_value)
        if not roots:
            raise _Unsupported("no trees")

        def joined(name: str, dtype) -> np.ndarray:
            return np.concatenate(columns[name]).astype(dtype) if columns[name] else np.zeros(1, dtype=dtype)

        self.split_feature = joined("feature", np.int64)
        self.threshold = joined("threshold", np.float64)
        self.categorical = joined("categorical", np.bool_)
        self.cat_start, self.cat_end = joined("cat_start", np.int32), joined("cat_end", np.int32)
        self.cat_bits = joined("cat_bits", np.uint32)
        self.arrays = self._node_arrays(joined("default_left", np.bool_), joined("missing", np.int8),
                                        joined("left", np.int32), joined("right", np.int32),
                                        joined("leaf_value", np.float64), np.array(roots, dtype=np.int32))

    def _node_arrays(self, default_left, missing, left, right, leaf_value, roots) -> tuple:
        """The arrays `_predict` walks. LightGBM's per-node rule for a numerical value v (after
        |v| <= kZeroThreshold became 0.0) is: missing type None: NaN is read as 0.0, then v <= threshold
        goes left; NaN: NaN takes the default side, others compare; Zero: NaN and 0.0 take the default
        side, others compare. So for None and NaN nodes NaN's side is fixed per node (`nan_child`) and the
        rest is one comparison; Zero nodes and categorical ones are marked `feature = ~index`."""
        default = np.where(default_left, left, right)
        zero_side = np.where(0.0 <= self.threshold, left, right)
        nan_child = np.where(missing == _MISSING_NONE, zero_side, default).astype(np.int32)
        kind = np.where(self.categorical, _CATEGORICAL,
                        np.where(missing == _MISSING_ZERO, _ZERO_MISSING, _PLAIN)).astype(np.int8)
        feature = np.where(kind == _PLAIN, self.split_feature, ~self.split_feature).astype(np.int32)
        return (feature, self.threshold, kind, left, right, nan_child, self.cat_start, self.cat_end, self.cat_bits,
                leaf_value, roots)

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
            kernel = cls(booster.model_to_string())
        except (_Unsupported, KeyError, IndexError, TypeError, ValueError):
            return None
        probe = kernel.probe_matrix()
        if not np.array_equal(kernel.predict(probe), booster.predict(probe, num_threads=1), equal_nan=True):
            return None
        return kernel

    def probe_matrix(self, rows: int = _PROBE_ROWS, seed: int = 0) -> np.ndarray:
        """Rows mixing every split threshold, its neighbours, zeros (+-0, +-1e-36), negatives, NaN and the
        categories (and non-integral, negative, huge values) of every categorical split."""
        feature, threshold, categorical = self.split_feature, self.threshold, self.categorical
        candidates: list[list[float]] = [[0.0, -0.0, 1e-36, -1e-36, math.nan, -1.0, 1.0, 1e300, -1e300, 0.5, -0.5]
                                         for _ in range(self.n_features)]
        bits, starts, ends = self.cat_bits, self.cat_start, self.cat_end
        for node in range(len(feature)):
            values = candidates[feature[node]]
            if not categorical[node]:
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


def _key_values(text: str) -> dict[str, str]:
    """The `key=value` lines of a model text section."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _numbers(text: str, dtype) -> np.ndarray:
    """A space-separated array of the model text; doubles are written with full precision, so exact."""
    return np.array([float(v) if dtype is np.float64 else int(v) for v in text.split()], dtype=dtype)


def _output_transform(fields: dict[str, str]) -> float:
    """The sigmoid parameter of a single-output binary model (objective 'binary sigmoid:1'), IDENTITY for a
    regression whose output is the raw score; anything else is unsupported."""
    if int(fields.get("num_class", "1")) != 1 or int(fields.get("num_tree_per_iteration", "1")) != 1:
        raise _Unsupported("more than one output")
    objective = fields.get("objective", "").split()
    if objective and objective[0] in IDENTITY_OBJECTIVES:
        return IDENTITY
    if not objective or objective[0] != "binary":
        raise _Unsupported(f"objective {fields.get('objective')!r}")
    for part in objective[1:]:
        if part.startswith("sigmoid:"):
            sigmoid = float(part.split(":", 1)[1])
            if sigmoid == IDENTITY:
                raise _Unsupported("binary objective with sigmoid 0")
            return sigmoid
    raise _Unsupported("binary objective without a sigmoid")
