"""Prefix-cache TTL: cached KV blocks unused for longer than a TTL stop being reusable.

An expiry bound on top of vLLM's LRU, never a pin (docs/ttl.md):

* :mod:`.config`: where the TTL comes from and what a valid one is;
* :mod:`.pool`: the policy on one vLLM ``BlockPool`` instance;
* :mod:`.expiry`: its bookkeeping (which free cached blocks expire when, O(1) amortised);
* :mod:`.metrics`: payload and Prometheus metrics (names used by ``vllm-nf4kv stats``);
* :mod:`.engine` and :mod:`.frontend`: the engine-core and API-server glue;
* :mod:`.patches`: the vLLM patches that install that glue (indexed in ``vllm_nf4kv.patches``).

Importing this package imports nothing from vLLM.
"""
