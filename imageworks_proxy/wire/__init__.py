"""OpenAI wire-format helpers shared by the pipeline, the adapters and observability: message content
parts (:mod:`.content`) and the ids the proxy mints (:mod:`.ids`). No I/O, no aiohttp."""
