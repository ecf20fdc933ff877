"""Tools beside the plugin: nothing on a serving path imports this package.

* the ``vllm-nf4kv`` commands (see :mod:`vllm_nf4kv.cli`): :mod:`.plan`, :mod:`.report`,
  :mod:`.ablate`, :mod:`.calibrate`, :mod:`.stats` (which also holds the one Prometheus
  text parser);
* what the ablation and the report fake-quantize with: :mod:`.kv_formats` (format specs
  over :mod:`vllm_nf4kv.reference`), :mod:`.kv_calibration` (ablation statistics over
  :mod:`vllm_nf4kv.calibration_measure`), :mod:`.hf_hooks` (a transformers model's attention);
* what the tests, the benchmarks and the soak measure with: :mod:`.llm_measures` (KV capacity,
  perplexity, greedy agreement on a ``vllm.LLM``) and :mod:`.loopback_server` (a ``vllm serve``
  on 127.0.0.1 started and stopped as one process group).
"""
