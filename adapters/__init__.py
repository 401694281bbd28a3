"""The built-in vendor adapters: the image backends `demo`, `openai-compatible`, `litellm`,
`diffusers`; the hosted moderation judges (adapters.moderation); the S3-compatible image store.

They implement the contracts of `guard.plugins` and are listed once, in `guard.plugins.BUILTINS`,
resolved from there on first use like a third party's entry point. Each adapter validates its own
options in its `from_config`.
"""
