"""Single-port vLLM orchestration and GPU tenancy (SPEC §11).

- :mod:`.command` builds the vLLM command line from a registry entry;
- :mod:`.process` spawns, polls and stops process groups (port and VRAM release included);
- :mod:`.state` is the active-vLLM state file (atomic writes, adoption checks);
- :mod:`.supervisor` owns the one vLLM process (launch, readiness, stop, adoption, crash detection);
- :mod:`.scheduler` decides who may use the GPU and when to switch (installed as ``app[keys.TENANCY]``).

The ``vllm-orchestrated`` adapter (:mod:`imageworks_proxy.adapters.vllm_orchestrated`) ties them together.
"""
