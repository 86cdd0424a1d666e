"""C++ (ATen) CPU backend: ``csrc/attention_ops.cpp``, compiled on demand and cached per torch version.

Importing never compiles. The backend is ``AVAILABLE`` when a build of these exact sources for this
torch already sits in the cache (``$DREAMBLEND_CACHE_DIR``, else ``$XDG_CACHE_HOME/dreamblend``, else
``~/.cache/dreamblend``), or when ``DREAMBLEND_BUILD_CPP=1`` asks to build it during the import.
``build()`` or ``python -m dreamblend.ops.cpp`` compiles it explicitly (a C++ compiler and ninja).

The kernels are ``torch.library`` ops (``torch.ops.dreamblend_cpp.*``) whose gradients are registered
in C++ on the ops' Autograd key (a Python autograd wrapper cost about 0.15 ms per layer and guided
step), so any caller of the ops gets them and ``torch.compile`` traces the ops (with the fake kernels
below) without graph breaks, as it does the Triton backend's.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from dreamblend.ops.reference import compute_dtype

__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "bf16_products_available",
    "build",
    "build_directory",
    "capture_attention",
    "capture_rows",
    "guided_attention",
    "simd_level",
    "simd_levels",
    "use_bf16_products",
]

_NAME = "dreamblend_cpp"
_SOURCES = ("attention_ops.cpp",)
_HEADERS = ("row_kernels.h",)  # included by the sources: part of the build key and the package
# Baseline target, no -march=native: measured on an AVX-512 Xeon (1 thread, guided fwd + dQ bwd at
# SD1.5's 4096- and 1024-query layers and a toy layer), a native build was within +-4 % of this one.
_CFLAGS = ("-O3",)
# at::parallel_for is header code that runs serially unless compiled with OpenMP; on Linux the
# extension then shares the libgomp that torch already loaded (same soname).
_OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what torch.utils.cpp_extension names it


def _source_dir() -> Path | None:
    """``csrc/`` of a source checkout (editable install), or the copy a wheel ships in the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    return None


def _cache_root() -> Path:
    base = os.environ.get("DREAMBLEND_CACHE_DIR")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreamblend"
    return Path(base) / f"cpp-{torch.__version__}"


def build_directory() -> Path:
    """Where this torch's build of the current sources lives: keyed by a hash of sources and flags,
    so an edited source never loads a stale binary and old builds never need invalidating."""
    src = _source_dir()
    if src is None:
        raise FileNotFoundError(
            f"the C++ sources {_SOURCES} are not installed next to dreamblend (expected in csrc/)"
        )
    digest = hashlib.sha256(" ".join(_CFLAGS + _OPENMP).encode())
    for name in _SOURCES + _HEADERS:
        digest.update((src / name).read_bytes())
    return _cache_root() / digest.hexdigest()[:16]


def _register_python_side() -> None:
    """Fake kernels for the ops; once per process, after the library is loaded."""
    fakes = {
        "capture_attention": _capture_fake,
        "guided_attention": _guided_fake,
        "attention_backward": _backward_fake,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{_NAME}::{name}", fake)


def _set_loaded() -> None:
    global AVAILABLE, UNAVAILABLE_REASON
    if not AVAILABLE:
        _register_python_side()
    AVAILABLE, UNAVAILABLE_REASON = True, ""


def _load_cached() -> str:
    """Load a cached build of the current sources; the reason it is unavailable otherwise."""
    try:
        library = build_directory() / f"{_NAME}{_LIB_SUFFIX}"
    except FileNotFoundError as exc:
        return str(exc)
    if not library.is_file():
        return (
            f"the C++ extension is not built for torch {torch.__version__}; build it once with "
            "`python -m dreamblend.ops.cpp` (or set DREAMBLEND_BUILD_CPP=1)"
        )
    try:
        torch.ops.load_library(str(library))
    except Exception as exc:  # noqa: BLE001 - a broken cache entry only disables this backend
        return f"the cached C++ extension {library} does not load ({exc}); rebuild with build()"
    _set_loaded()
    return ""


def build(verbose: bool = False) -> Path:
    """Compile (or find up to date) and load the extension; returns the build directory.

    Later processes load the cached library at import without compiling. Raises when the sources,
    the compiler or ninja are missing, or when compilation fails.
    """
    from torch.utils import cpp_extension  # pulls in setuptools: only when building

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("building the C++ extension needs ninja: `pip install ninja`")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(_source_dir() / name) for name in _SOURCES]
    cpp_extension.load(
        _NAME,
        sources,
        extra_cflags=[*_CFLAGS, *_OPENMP],
        extra_ldflags=list(_OPENMP),
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )
    _set_loaded()
    # A dispatcher imported before this build recorded the backend as missing; point it here.
    dispatcher = sys.modules.get("dreamblend.ops")
    if dispatcher is not None and hasattr(dispatcher, "register_backend"):
        dispatcher.register_backend("cpp", sys.modules[__name__])
    return directory


# ---- fake kernels -----------------------------------------------------------------------------------


def _map_shape(
    q: Tensor, k: Tensor, tokens: Tensor | None, head_mean: bool, map_start: int = 0, map_stop: int = -1
) -> tuple[int, ...]:
    b, h, m, _ = q.shape
    b = (b if map_stop < 0 else map_stop) - map_start
    t = k.shape[2] if tokens is None else tokens.numel()
    return (b, m, t) if head_mean else (b, h, m, t)


def _rows_like(q: Tensor) -> Tensor:
    """``(B, H, M, D)`` in ``(B, M, H, D)`` memory order, as the kernels write ``out`` and ``dq``."""
    b, h, m, d = q.shape
    return q.new_empty(b, m, h, d).transpose(1, 2)


def _capture_fake(
    q: Tensor, k: Tensor, v: Tensor, tokens: Tensor | None, scale: float, head_mean: bool,
    map_start: int = 0, map_stop: int = -1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    maps = q.new_empty(_map_shape(q, k, tokens, head_mean, map_start, map_stop), dtype=compute_dtype(q))
    return _rows_like(q), maps


def _guided_fake(
    q: Tensor, k: Tensor, v: Tensor, ref: Tensor, tokens: Tensor | None, scale: float, head_mean: bool
) -> tuple[Tensor, Tensor, Tensor]:
    stats = q.new_empty(*q.shape[:3], 2, dtype=compute_dtype(q))
    return _rows_like(q), q.new_empty(q.shape[0], dtype=compute_dtype(q)), stats


def _backward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens: Tensor | None,
    d_out: Tensor | None,
    d_maps: Tensor | None,
    ref: Tensor | None,
    d_loss: Tensor | None,
    scale: float,
    head_mean: bool,
    need_dq: bool,
    need_dk: bool,
    need_dv: bool,
    map_start: int = 0,
    map_stop: int = -1,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    def grad(like: Tensor, needed: bool) -> Tensor:
        return like.new_empty(like.shape if needed else (0,))

    return _rows_like(q) if need_dq else q.new_empty(0), grad(k, need_dk), grad(v, need_dv)


# ---- backend entry points ---------------------------------------------------------------------------


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the C++ backend is unavailable: {UNAVAILABLE_REASON}")


def capture_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, tokens: Tensor | None, head_mean: bool):
    """``(out, maps)`` of DESIGN §2; the dispatcher's entry point for backend="cpp"."""
    _require()
    return torch.ops.dreamblend_cpp.capture_attention(q, k, v, tokens, scale, head_mean)


def capture_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    tokens: Tensor | None,
    head_mean: bool,
    start: int,
    stop: int,
) -> tuple[Tensor, Tensor]:
    """Every row's ``out`` with maps of batch rows ``[start, stop)`` only, in one call: the conditional
    half of a classifier-free-guidance batch, without a second attention for the rest and a join."""
    _require()
    return torch.ops.dreamblend_cpp.capture_attention(q, k, v, tokens, scale, head_mean, start, stop)


def guided_attention(
    q: Tensor, k: Tensor, v: Tensor, ref: Tensor, scale: float, tokens: Tensor | None, head_mean: bool
):
    """``(out, loss)`` of DESIGN §2 with the per-sample L1 loss against ``ref``."""
    _require()
    out, loss, _row_stats = torch.ops.dreamblend_cpp.guided_attention(q, k, v, ref, tokens, scale, head_mean)
    return out, loss


SIMD_LEVELS = ("portable", "avx2", "avx512")


def simd_levels() -> tuple[str, ...]:
    """The instruction sets this CPU runs the float row kernels (softmax, L1, softmax backward) in."""
    _require()
    return SIMD_LEVELS[: torch.ops.dreamblend_cpp.simd_detected() + 1]


def simd_level(level: str | None = None) -> str:
    """The row kernels' instruction set (the widest the CPU has by default); with ``level``, switch to
    it and return the previous one: tests run every set the CPU has, as other CPUs would."""
    _require()
    if level is not None and level not in SIMD_LEVELS:
        raise ValueError(f"unknown SIMD level {level!r}; choose one of {SIMD_LEVELS}")
    code = -1 if level is None else SIMD_LEVELS.index(level)
    return SIMD_LEVELS[torch.ops.dreamblend_cpp.simd_level(code)]


def bf16_products_available() -> bool:
    """Whether bfloat16 inputs can take bf16 matrix products with float32 accumulation: a CPU with
    AVX512-BF16 (AMX or not) and torch's oneDNN enabled (``torch.backends.mkldnn``)."""
    _require()
    return torch.ops.dreamblend_cpp.bf16_products_available()


def use_bf16_products(enabled: bool | None = None) -> bool:
    """Whether bfloat16 inputs use the bf16 products now (on by default where available). With
    ``enabled``, switch the setting and return the previous one, to restore later: tests run the float32
    products too, as other CPUs do. The setting holds while torch's oneDNN is off (nothing uses the
    products then); switching on is refused only on a CPU without AVX512-BF16."""
    _require()
    return torch.ops.dreamblend_cpp.use_bf16_products(-1 if enabled is None else int(enabled))


AVAILABLE = False
UNAVAILABLE_REASON = ""

if __name__ == "__main__":
    # `python -m` runs a second copy of this file: build through the package's module, which the
    # dispatcher already imported, so the ops are registered once.
    from dreamblend.ops import cpp

    print(cpp.build(verbose="-v" in sys.argv[1:]))
else:
    UNAVAILABLE_REASON = _load_cached()
    if UNAVAILABLE_REASON and os.environ.get("DREAMBLEND_BUILD_CPP") == "1":
        try:
            build()
        except Exception as exc:  # noqa: BLE001 - importing must not fail; the reason says what went wrong
            UNAVAILABLE_REASON = f"building the C++ extension failed (DREAMBLEND_BUILD_CPP=1): {exc}"
