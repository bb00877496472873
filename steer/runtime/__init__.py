"""The decode runtime: the one place steer turns prompts into replies.

- :mod:`~steer.runtime.scheduler`: the continuous-batching decode loop (admission, the batch's
  slots, one step after another), run on a thread by ``steer serve`` and on the calling thread by
- :mod:`~steer.runtime.generator`: :class:`SteerGenerator`, the library entry (``steer generate``,
  best-of-n, the eval);
- the engines the scheduler runs (:mod:`~steer.runtime.engines`): :mod:`~steer.runtime.torch_batch`
  (transformers) and :mod:`~steer.runtime.llamacpp` (llama.cpp), each a runner of the batch;
- :mod:`~steer.runtime.model_runner` (prefill, decode step), :mod:`~steer.runtime.mixed_step`
  (a decode step that prefills joining rows), :mod:`~steer.runtime.kv_cache` (the cache and the
  batch's cache operations), :mod:`~steer.runtime.sampling`, :mod:`~steer.runtime.stopping` (where
  a reply ends), :mod:`~steer.runtime.detokenize`, and :mod:`~steer.runtime.compat` (every
  transformers-internals shim).
"""
