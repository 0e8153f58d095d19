"""A static scan of pickle opcodes, run before a trusted pickle is loaded.

Allow-list of named globals, not of modules: every (module, name) the pickle would
import must be one that builds data: numpy's array and scalar reconstructors and its
ufuncs, scikit-learn's estimator classes and the helper classes they pickle, scipy's
sparse matrices, and a few builtins. A module prefix is never enough: `numpy` alone
holds `numpy.load` and `numpy.testing._private.utils.runstring` (which calls `exec`),
and `numpy.core._ufunc_reconstruct` imports any module it is given.

A global is read where the unpickler reads it: GLOBAL and INST carry it inline (after
the renaming that protocols 0-2 apply, `__builtin__` to `builtins`, `commands` to
`subprocess`, ...), and STACK_GLOBAL takes it from the two strings just pushed; any
other way of putting strings there is refused, as are the opcodes that import
through a registry (EXT1/2/4) or hand objects to a hook (PERSID, BINPERSID).
"""

from __future__ import annotations

import functools
import pickletools
from pathlib import Path

from bastion.errors import ModelLoadError

_NAMED = frozenset(
    {
        ("builtins", name)
        for name in (
            "dict",
            "list",
            "set",
            "frozenset",
            "tuple",
            "slice",
            "bytes",
            "bytearray",
            "complex",
            "object",
        )
    }
    | {
        ("copyreg", "_reconstructor"),
        ("copyreg", "__newobj__"),
        ("_codecs", "encode"),  # protocol 2 writes bytes as encode(text, "latin1")
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random.bit_generator", "SeedSequence"),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
        ("numpy.random.mtrand", "RandomState"),
        ("numpy.random._generator", "Generator"),
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random._pcg64", "PCG64"),
        ("numpy.random._pcg64", "PCG64DXSM"),
        ("numpy.random._philox", "Philox"),
        ("numpy.random._sfc64", "SFC64"),
    }
    | {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}
    | {
        # Helper classes scikit-learn's fitted estimators pickle besides the estimators themselves.
        ("sklearn.tree._tree", "Tree"),
        ("sklearn.ensemble._hist_gradient_boosting.binning", "_BinMapper"),
        ("sklearn.ensemble._hist_gradient_boosting.predictor", "TreePredictor"),
        ("sklearn.neural_network._stochastic_optimizers", "AdamOptimizer"),
        ("sklearn.neural_network._stochastic_optimizers", "SGDOptimizer"),
        ("sklearn.neighbors._kd_tree", "KDTree"),
        ("sklearn.neighbors._kd_tree", "newObj"),  # cls.__new__(cls), for an allowed class only
        ("sklearn.neighbors._ball_tree", "BallTree"),
        ("sklearn.neighbors._ball_tree", "newObj"),
        ("sklearn.metrics._dist_metrics", "newObj"),
        ("sklearn._loss.link", "Interval"),
    }
)

_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


def _classes(module: object, base: type) -> set[tuple[str, str]]:
    """(module, qualname) of each class in `module` that derives from `base`."""
    found = set()
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, base):
            found.add((value.__module__, value.__qualname__))
    return found


@functools.cache
def allowed_globals() -> frozenset[tuple[str, str]]:
    """Every (module, qualname) a scanned pickle may import, named one by one from the libraries
    installed (their estimator classes, ufuncs, scalar types and sparse matrices)."""
    import numpy as np
    import scipy.sparse
    from sklearn._loss import _loss, link, loss
    from sklearn.metrics import _dist_metrics as dist_metrics
    from sklearn.utils import all_estimators

    names = set(_NAMED)
    for attr, value in vars(np).items():
        if isinstance(value, np.ufunc) or (isinstance(value, type) and issubclass(value, np.generic)):
            names.add(("numpy", attr))
    for _, cls in all_estimators():
        names.add((cls.__module__, cls.__qualname__))
    from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
    from sklearn.pipeline import FeatureUnion, Pipeline

    for cls in (Pipeline, FeatureUnion, ColumnTransformer, TransformedTargetRegressor):
        names.add((cls.__module__, cls.__qualname__))
    names |= _classes(loss, loss.BaseLoss) | _classes(link, link.BaseLink)
    # The metrics a neighbours tree keeps; not PyFuncDistance, which calls a function it is given.
    names |= {
        pair
        for pair in _classes(dist_metrics, dist_metrics.DistanceMetric)
        if not pair[1].startswith("PyFunc")
    }
    names |= {(c.__module__, c.__qualname__) for c in vars(_loss).values() if isinstance(c, type)}
    names |= _classes(scipy.sparse, scipy.sparse.sparray) | _classes(scipy.sparse, scipy.sparse.spmatrix)
    return frozenset(names)


def _resolved(module: str, name: str, protocol: int) -> tuple[str, str]:
    """The global the unpickler imports: protocols 0-2 rename Python 2 names (fix_imports)."""
    if protocol >= 3:
        return module, name
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _check(path: Path, module: str | None, name: str | None, protocol: int) -> None:
    if module is None or name is None:
        raise ModelLoadError(f"{path}: pickle refused: it imports a global built at load time")
    real = _resolved(module, name, protocol)
    if real not in allowed_globals():
        raise ModelLoadError(f"{path}: pickle refused: it imports {real[0]}.{real[1]}")


def scan_pickle(path: Path, data: bytes) -> None:
    """Raise ModelLoadError naming the first global outside the allow-list, or a malformed stream."""
    protocol = 0
    # The strings known to be on top of the stack: pushed by the opcodes just before, with nothing
    # in between but memo writes. Any other opcode clears them.
    top: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                top = [*top[-1:], str(arg)]
            elif name in _GET_OPS:
                top = [*top[-1:], memo.get(int(arg))]  # type: ignore[arg-type]
            elif name == "MEMOIZE":
                memo[len(memo)] = top[-1] if top else None
            elif name in _PUT_OPS:
                memo[int(arg)] = top[-1] if top else None  # type: ignore[arg-type]
            elif name == "FRAME":
                continue  # framing only: the stack is untouched
            elif name == "PROTO":
                protocol = int(arg)  # type: ignore[arg-type]
                top = []
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                _check(path, module, attr, protocol)
                top = []
            elif name == "STACK_GLOBAL":
                pair = (top[0], top[1]) if len(top) == 2 else (None, None)
                _check(path, *pair, protocol)
                top = []
            elif name in _REFUSED_OPS:
                raise ModelLoadError(f"{path}: pickle refused: opcode {name} is not allowed")
            else:
                top = []
    except ModelLoadError:
        raise
    except Exception as e:  # a truncated or malformed opcode stream
        raise ModelLoadError(
            f"{path}: pickle refused: unreadable opcode stream ({type(e).__name__})"
        ) from None
