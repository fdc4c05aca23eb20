"""What a parameter is for, and the named selections of parameters: the words every layer shares.

The architecture adapters give each parameter a role; phase 1's config keys
(`fisher.per_sample_params`, `fisher.fisher_m2_params`) and phase 3's `masks.include` name
a selection of roles, or give a regex. This module imports nothing, so the config can
check a selection's name without importing torch.
"""

from __future__ import annotations

#: The blocks an attention head has a slice of.
HEAD_BLOCKS = ("q", "k", "v", "o")
#: The blocks indexed by KV head under grouped-query attention (Q and O: by query head).
KV_BLOCKS = ("k", "v")
#: What a parameter is for; `qkv` is a fused Q/K/V projection.
ROLES = ("q", "k", "v", "o", "qkv", "mlp_in", "mlp_out", "embed", "lm_head", "norm", "other")
#: Named parameter selections -> the roles they select (None: every parameter).
NAMED_SELECTIONS: dict[str, frozenset[str] | None] = {
    "attention": frozenset({"q", "k", "v", "o", "qkv"}),
    "mlp": frozenset({"mlp_in", "mlp_out"}),
    "blocks": frozenset({"q", "k", "v", "o", "qkv", "mlp_in", "mlp_out"}),
    "all": None,
    "none": frozenset(),
}


def head_axis(block: str) -> str:
    """What the heads of `block` are: "KV head" for K and V, else "head" (axis labels, messages)."""
    return "KV head" if block in KV_BLOCKS else "head"
