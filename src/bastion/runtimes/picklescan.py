"""A static scan of pickle opcodes, run before a trusted pickle is loaded.

Allow-list, not deny-list: every global the pickle would import must come from
a module that builds data (numpy, scipy, scikit-learn and a few builtins). A
pickle that names anything else (`os.system`, `builtins.eval`,
`subprocess.Popen`, ...) is refused without being loaded.
"""

from __future__ import annotations

import pickletools
from pathlib import Path

from bastion.errors import ModelLoadError

_ALLOWED_MODULE_PREFIXES = ("numpy", "scipy.", "sklearn.", "_codecs", "collections")
_ALLOWED_BUILTINS = {
    "builtins.dict",
    "builtins.list",
    "builtins.set",
    "builtins.frozenset",
    "builtins.tuple",
    "builtins.slice",
    "builtins.bytearray",
    "builtins.complex",
    "builtins.object",
    "copyreg._reconstructor",
    "copyreg.__newobj__",
}
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}


def _allowed(module: str, name: str) -> bool:
    qualified = f"{module}.{name}"
    if qualified in _ALLOWED_BUILTINS:
        return True
    return module == "numpy" or (
        module.startswith(_ALLOWED_MODULE_PREFIXES) and not module.startswith("numpy.f2py")
    )


def scan_pickle(path: Path, data: bytes) -> None:
    """Raise ModelLoadError naming the first global outside the allow-list, or a malformed stream."""
    # STACK_GLOBAL takes its module and name from the stack; they were pushed just before it, as
    # strings or as memo references to earlier strings. Track exactly those pushes.
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                pushed.append(str(arg))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))  # type: ignore[arg-type]
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None  # type: ignore[arg-type]
            elif name in ("GLOBAL", "INST"):
                mod, _, att = str(arg).partition(" ")
                if not _allowed(mod, att):
                    raise ModelLoadError(f"{path}: pickle refused: it imports {mod}.{att}")
            elif name == "STACK_GLOBAL":
                module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                if module is None or attr is None or not _allowed(module, attr):
                    raise ModelLoadError(f"{path}: pickle refused: it imports {module}.{attr}")
    except ModelLoadError:
        raise
    except Exception as e:  # a truncated or malformed opcode stream
        raise ModelLoadError(
            f"{path}: pickle refused: unreadable opcode stream ({type(e).__name__})"
        ) from None
