"""Count what torch dispatches inside a block: how many kernels it would launch on a GPU, and how often it would
read a value back to the host (an `item`, a `nonzero`, a tensor's truth value), each such read waiting there for
every queued kernel. Counted on the CPU, where the same operations are dispatched.

    with Dispatched() as d:
        f(x)
    d.ops, d.read_backs
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

READ_BACKS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.item.default"}


class Dispatched(TorchDispatchMode):
    """`ops`: operations dispatched while active, views apart (they launch nothing); `read_backs`: those that read a
    value back to the host."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.read_backs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        self.read_backs += str(func) in READ_BACKS
        return func(*args, **(kwargs or {}))
