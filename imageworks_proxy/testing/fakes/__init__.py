"""Fake upstreams for tests: real servers on loopback that answer like the backends the proxy talks to.

- :mod:`~imageworks_proxy.testing.fakes.openai`: an OpenAI-compatible server (``make_fake_openai()``,
  run with ``aiohttp_server``) whose requested ``model`` picks the behaviour: ``echo``, ``tools``,
  ``error404`` and a dozen misbehaviours; ``registry_for(base_url)`` writes one entry per mode.
- :mod:`~imageworks_proxy.testing.fakes.ollama`: Ollama's native API (``FakeOllama(models).app()``), with
  answers scripted per request by a responder returning ``Reply``.
- :mod:`~imageworks_proxy.testing.fakes.vllm`: a vLLM server run as a real subprocess, the way the
  orchestrator launches vLLM (``CHAT_PROXY_VLLM_COMMAND=fakes.vllm.command()``).

They need only aiohttp and attrs (nothing here imports pytest); import the module you use.
"""
