"""Serving: vLLM engines on Ray Serve behind an OpenAI-compatible ingress.

Modules, one concept each:

- :mod:`~rayloop.serving.engine`: the ``Engine`` interface; :mod:`~rayloop.serving.vllm_engine`
  (vLLM ``AsyncLLM``) and :mod:`~rayloop.serving.fake_engine` (unit tests).
- :mod:`~rayloop.serving.server`: ``LLMServer``, one engine per replica, versions
  swapped in place by ``reconfigure(user_config)``.
- :mod:`~rayloop.serving.ingress`: ``OpenAIIngress`` (FastAPI), slots, capture, feedback.
- :mod:`~rayloop.serving.app`: ``ServeArgs`` and ``build_openai_app``.
- :mod:`~rayloop.serving.deploy`: declarative deploy/upgrade (``rayloop serve``).
- :mod:`~rayloop.serving.checkpoint`, :mod:`~rayloop.serving.golden`: checks before and after a swap.

Heavy modules (vLLM, Ray Serve) are imported only where used.
"""

from rayloop.serving.protocol import REQUEST_ID_HEADER, VERSION_HEADER, ModelConfig, served_model_id

__all__ = ["REQUEST_ID_HEADER", "VERSION_HEADER", "ModelConfig", "served_model_id"]
