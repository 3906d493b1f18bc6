"""Serving: vLLM engines on Ray Serve behind an OpenAI-compatible ingress.

Modules, one concept each:

- :mod:`~rayloop.serving.engine`: the ``Engine`` interface; :mod:`~rayloop.serving.vllm_engine`
  (vLLM ``AsyncLLM``) and :mod:`~rayloop.serving.fake_engine` (unit tests).
- :mod:`~rayloop.serving.server`: ``LLMServer``, one engine per replica, versions
  swapped in place by ``reconfigure(user_config)``.
- :mod:`~rayloop.serving.ingress`: ``OpenAIIngress`` (FastAPI), slots, capture, feedback.
- :mod:`~rayloop.serving.engine_ingress`: ``EngineIngress``, the stable replicas: ingress, router and engine.
- :mod:`~rayloop.serving.routing`, :mod:`~rayloop.serving.shadow`, :mod:`~rayloop.serving.stats`: route
  tables, shadow copies and the live per-slot metrics rollouts judge.
- :mod:`~rayloop.serving.app`: the one app layout (``ServeArgs``, ``AppState``, configs, the Serve builder).
- :mod:`~rayloop.serving.control`: the one Serve seam (read apps, apply a config, wait for a layout).
- :mod:`~rayloop.serving.deploy`: ``rayloop serve`` (first deploy, in-place upgrade of the stable slot).
- :mod:`~rayloop.serving.checkpoint`, :mod:`~rayloop.serving.golden`: checks before and after a swap.

Heavy modules (vLLM, Ray Serve) are imported only where used.
"""

from rayloop.serving.protocol import REQUEST_ID_HEADER, VERSION_HEADER, ModelConfig, served_model_id

__all__ = ["REQUEST_ID_HEADER", "VERSION_HEADER", "ModelConfig", "served_model_id"]
