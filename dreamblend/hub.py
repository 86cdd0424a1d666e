"""One-line errors for a model named by hub id that cannot be had: offline, missing, private or gated.

diffusers reports every such case as "X does not appear to have a file named model_index.json",
after a traceback; the cause (no network, ``HF_HUB_OFFLINE``, a gated licence) is buried in the
exception chain. :func:`hub_errors` reads the chain and says the cause and the fix in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffusers.utils import deprecation_utils
from huggingface_hub import errors as hub

# diffusers renamed from_pretrained's `torch_dtype` to `dtype`; older releases only know the former.
DTYPE_KWARG = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


class ModelUnavailableError(FileNotFoundError):
    """A hub id whose files are neither in the local cache nor downloadable now."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def describe(name: str, exc: BaseException) -> str:
    """Why ``name`` could not be loaded, and what to do about it, in one line."""
    chain = list(_chain(exc))

    def found(kind: type[BaseException]) -> bool:
        return any(isinstance(e, kind) for e in chain)

    local = "pass a local diffusers folder instead"
    if found(hub.GatedRepoError):
        cause = "it is gated: accept its terms on its Hub page, then log in (`hf auth login` or HF_TOKEN)"
    elif found(hub.RepositoryNotFoundError):
        cause = "no such repository on the Hub (or it is private: log in with `hf auth login`); check the id"
    elif found(hub.OfflineModeIsEnabled) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true"):
        cause = (
            f"offline mode (HF_HUB_OFFLINE) and it is not in the local cache: {local}, or download it "
            f"once online (`hf download {name}`)"
        )
    elif found(hub.LocalEntryNotFoundError) or found(ConnectionError) or found(TimeoutError):
        cause = (
            f"the Hub cannot be reached and it is not in the local cache: {local}, or download it where "
            f"there is a network (`hf download {name}`) and set HF_HUB_OFFLINE=1"
        )
    elif found(hub.EntryNotFoundError):
        cause = f"the repository lacks a file diffusers needs ({exc}); is it a diffusers model?"
    else:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"cannot load {name!r} from the Hugging Face Hub: {cause}"


@contextmanager
def hub_errors(name: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` from loading the hub id ``name`` into a one-line :class:`ModelUnavailableError`.

    A local folder's errors pass through unchanged: they name the file that is wrong.
    """
    try:
        yield
    except ModelUnavailableError:
        raise
    except OSError as exc:
        if Path(name).exists():
            raise
        raise ModelUnavailableError(describe(str(name), exc)) from None
