"""StepModule: the nn.Module of the small modules a forward pass calls several times per layer."""

from __future__ import annotations

from torch import nn


class StepModule(nn.Module):
    """An nn.Module whose call is its forward, without nn.Module.__call__'s hook and tracing
    dispatch: that costs ~1 us a call on a 2-vCPU Xeon, and each decoder layer calls six of these
    (two norms, attention and its backend call, the MLP and its activation) every step, ~0.2 ms of
    a 30-layer model's batch-1 decode step; the projections (engine/layers/linear.py's Linear) are
    four more. They take no forward hooks (registering one raises
    rather than being ignored): hook the decoder layers instead, as bench/profile_step.py does."""

    def __call__(self, *args):
        return self.forward(*args)

    def register_forward_hook(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is a StepModule, called without hooks; hook its decoder layer")

    register_forward_pre_hook = register_forward_hook
