"""Fitted models as plain data: numpy arrays plus JSON scalars, and nothing that can run code.

:class:`Persistent` is what every classifier in :mod:`cxr_embed.classifiers` implements: it declares
``PARAMS`` (JSON scalars: hyper-parameters and fitted numbers) and ``ARRAYS`` (name -> dtype and
symbolic shape), and :meth:`Persistent.from_state` rebuilds a fitted object only after
:func:`check_arrays` has checked every name, dtype, shape and value. :class:`TreeEnsemble` is a
fitted sklearn forest in that form (flat node arrays and a numpy predictor), because a forest object
itself can only be saved by pickling. The files are written and read by
:mod:`cxr_embed.classifier_files`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

ArraySpec = tuple[str, tuple[str | int, ...]]
"""(dtype, shape) of one stored array; a str dimension is a symbol that must agree across arrays."""


def check_arrays(spec: Mapping[str, ArraySpec], arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check names, dtypes, shapes and finiteness against ``spec``; return the bound dimensions.

    Raises ValueError naming the first array that does not fit, so a damaged or crafted file is
    refused before any of it is used.
    """
    extra, missing = sorted(set(arrays) - set(spec)), sorted(set(spec) - set(arrays))
    if extra or missing:
        raise ValueError(f"unexpected tensors {extra}, missing tensors {missing}")
    dims: dict[str, int] = {}
    for name, (dtype, shape) in spec.items():
        a = arrays[name]
        if a.dtype != np.dtype(dtype) or a.ndim != len(shape):
            raise ValueError(
                f"tensor {name} is {a.dtype} {list(a.shape)}, expected {dtype} with {len(shape)} dims"
            )
        for sym, n in zip(shape, a.shape, strict=True):
            want = sym if isinstance(sym, int) else dims.setdefault(sym, n)
            if n != want:
                raise ValueError(f"tensor {name} has shape {list(a.shape)}, which does not fit {list(shape)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"tensor {name} holds NaN or infinite values")
    return dims


def _json_scalar(value: Any) -> Any:
    """A fitted attribute as a plain JSON value (numpy scalars -> Python numbers, tuples -> lists)."""
    if isinstance(value, tuple | list):
        return [_json_scalar(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    return value is None or isinstance(value, bool | int | float)


class Persistent:
    """Saved as ``PARAMS`` (JSON scalars: hyper-parameters and fitted numbers) plus ``ARRAYS``.

    Subclasses implement ``_arrays`` (name -> array) and ``_set_arrays`` (the inverse, given the
    checked arrays and their bound dimensions).
    """

    PARAMS: tuple[str, ...] = ()
    ARRAYS: dict[str, ArraySpec] = {}

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(params, arrays) of a fitted classifier: everything :meth:`from_state` needs."""
        params = {p: _json_scalar(getattr(self, p)) for p in self.PARAMS}
        return params, {k: np.ascontiguousarray(v) for k, v in self._arrays().items()}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]):
        """Rebuild a fitted classifier from :meth:`get_state`'s output; ValueError if anything does not fit."""
        if set(params) != set(cls.PARAMS):
            raise ValueError(f"parameters {sorted(params)} are not the expected {sorted(cls.PARAMS)}")
        bad = [k for k, v in params.items() if not _is_json_scalar(v) or (k.endswith("_") and v is None)]
        if bad:
            raise ValueError(f"parameters {bad} are not plain numbers")  # fitted ones (name_) must be set
        dims = check_arrays(cls.ARRAYS, arrays)
        obj = cls.__new__(cls)
        for p in cls.PARAMS:
            setattr(obj, p, params[p])
        obj._set_arrays(arrays, dims)
        return obj

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_arrays(self, arrays: Mapping[str, np.ndarray], dims: dict[str, int]) -> None:
        raise NotImplementedError


@dataclass
class TreeEnsemble:
    """A fitted sklearn forest as flat node arrays (all trees concatenated) and a numpy predictor.

    Why not the sklearn object: it can only be saved by pickling (or skops), which can run code on
    load. The arrays are all prediction needs: per node the left/right child (-1 at a leaf), the
    split feature and threshold, and the leaf's probability of class 1 (sklearn's normalised
    ``value``); ``roots`` is each tree's first node. :meth:`predict_proba` walks every tree the way
    sklearn does (``x[feature] <= threshold`` in float32 vs float64) and sums the trees in order,
    so it equals ``RandomForestClassifier.predict_proba`` (to 1e-12; tests check it).
    """

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray
    roots: np.ndarray

    @classmethod
    def from_sklearn(cls, forest) -> TreeEnsemble:
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("left", "right", "feature", "threshold", "value")
        }
        roots, offset = [], 0
        positive = list(forest.classes_).index(1) if 1 in forest.classes_ else None
        for est in forest.estimators_:
            t = est.tree_
            values = t.value[:, 0, :]
            total = values.sum(1)
            total[total == 0.0] = 1.0
            leaf = t.children_left < 0
            roots.append(offset)
            parts["left"].append(np.where(leaf, -1, t.children_left + offset))
            parts["right"].append(np.where(leaf, -1, t.children_right + offset))
            parts["feature"].append(np.where(leaf, 0, t.feature))
            parts["threshold"].append(t.threshold)
            parts["value"].append(
                values[:, positive] / total if positive is not None else np.zeros(len(total))
            )
            offset += t.node_count
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        return cls(
            cat["left"].astype(np.int64),
            cat["right"].astype(np.int64),
            cat["feature"].astype(np.int64),
            cat["threshold"].astype(np.float64),
            cat["value"].astype(np.float64),
            np.asarray(roots, dtype=np.int64),
        )

    def check(self, n_features: int) -> None:
        """ValueError unless every index points inside the arrays (a crafted file must not crash predict)."""
        n = len(self.left)
        if not (len(self.right) == len(self.feature) == len(self.threshold) == len(self.value) == n):
            raise ValueError("tree arrays differ in length")
        internal = self.left >= 0
        if (
            ((self.right >= 0) != internal).any()
            or (self.left[internal] >= n).any()
            or (self.right[internal] >= n).any()
            or (self.feature < 0).any()
            or (self.feature >= n_features).any()
            or (self.roots < 0).any()
            or (self.roots >= n).any()
            # children come after their parents in sklearn's node order, so no walk can loop
            or (self.left[internal] <= np.flatnonzero(internal)).any()
            or (self.right[internal] <= np.flatnonzero(internal)).any()
        ):
            raise ValueError("tree arrays point outside the forest or back up a tree")

    def predict_proba(self, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Mean over trees of the leaf probability of class 1, for each row of ``X`` (float32).

        All (row, tree) pairs descend one level per step and leave the working set at their leaf,
        so each step costs only the pairs still inside a tree (about 5x sklearn's Cython loop).
        """
        out = np.zeros(len(X), dtype=np.float64)
        n_trees = len(self.roots)
        for start in range(0, len(X), chunk):
            block = np.ascontiguousarray(X[start : start + chunk])
            n, dim = block.shape
            flat = block.ravel()
            node = np.tile(self.roots, n)  # pair p = row * n_trees + tree
            leaf = np.empty(n * n_trees, dtype=np.int64)
            active = np.arange(n * n_trees)
            while active.size:
                left = self.left[node]
                internal = left >= 0
                leaf[active[~internal]] = node[~internal]
                active, node, left = active[internal], node[internal], left[internal]
                go_left = flat[(active // n_trees) * dim + self.feature[node]] <= self.threshold[node]
                node = np.where(go_left, left, self.right[node])
            values = self.value[leaf].reshape(n, n_trees)
            acc = np.zeros(n, dtype=np.float64)
            for t in range(n_trees):  # tree by tree, in sklearn's order of accumulation
                acc += values[:, t]
            out[start : start + n] = acc / n_trees
        return out
