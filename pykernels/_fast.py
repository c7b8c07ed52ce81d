"""The short way through ops.py for plain NumPy calls whose shapes and window arguments were vetted before.

ops.py's checks (array kinds and dtypes, the window arguments, shapes, contiguity, the result's allocation)
cost 2-4 us of Python per call, and far more when other code has run in between and evicted the
interpreter's own state from the caches, as a network's other layers or a peer library do: after a PyTorch
backward convolution, LeNet's 5x5 layer at batch 1 took 55.7 us that way against 32.1 this way (its
backward 91.6 against 67.5), resnet_3x3_128's forward at batch 1 415 against 398; called back to back,
LeNet's layer 5.6 against 4.1 us.

Each op tries this first where every array is an exact np.ndarray and no `out` is given. Its shapes and
window arguments must be those of an earlier call that passed all of ops.py's checks, remembered here by
value, like _args' geometry cache, only while made of exact ints, strs, None and tuples of them (those
compare equal only when they mean the same thing: stride=2.0 must not find stride=2's plan). The extension
then checks every array again (dtype, dimensions, shape, contiguity, overlap) and raises ValueError or
TypeError before writing anything the caller sees; the op then redoes the call through its checks, which
copy a non-contiguous input or raise their clearer message. Results are fresh arrays, so nothing is left
half written.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

from . import _args, _backend

#: The errors the extension raises for arguments it refuses (its ShapeError arrives as ValueError).
REFUSED = (ValueError, TypeError)

#: The CPU extension (None where it is not built: then no call ever succeeds, and nothing is remembered).
cpu = _backend._cpu


class Plan(NamedTuple):
    out_shape: tuple  # the result's (or for backward passes, grad_x's) shape
    out_count: int  # its number of values
    kernel_args: tuple  # the extension entry point's trailing arguments


_plans: dict = {}
_MOST_PLANS = 1024  # a network has tens of distinct layers; past this, start again rather than grow


def plan(name, fixed, window) -> Optional[Plan]:
    """The plan remembered for op `name` with `fixed` (its shapes, and a max-pool's ceil_mode) and the caller's
    `window` arguments (a tuple), provided those are exact; None otherwise."""
    try:
        found = _plans.get((name, fixed, window))
    except TypeError:  # an unhashable argument, a list say: the checked way handles it
        return None
    return found if found is not None and _args.plain_arguments(window) else None


def remember(name, fixed, window, out_shape, kernel_args) -> None:
    """Remember a call's plan (keyed as `plan` looks it up) after it passed the op's checks, where its window
    arguments are exact (see above)."""
    if not _args.plain_arguments(window):
        return
    if len(_plans) >= _MOST_PLANS:
        _plans.clear()
    _plans[(name, fixed, window)] = Plan(out_shape, math.prod(out_shape), kernel_args)


def forget() -> None:
    """Drop every plan (tests)."""
    _plans.clear()
