"""Every monkeypatch this plugin applies to vLLM, and nothing else.

Each patch is one function with a note: why, what it replaces, which vLLM
versions need it, and what upstream change would remove it. Each checks for the
feature it patches (never a version string) and is safe to call many times.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------
# Prefix-cache TTL (issue 4)
# ----------------------------------------------------------------------------


def install_block_pool_ttl() -> None:
    """Placeholder: the TTL block pool patch is being written in this section."""
