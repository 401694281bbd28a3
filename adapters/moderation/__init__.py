"""Hosted moderation services as judges: `openai-moderation`, `azure-content-safety`,
`google-safesearch`, `aws-rekognition`.

Each maps its service's categories onto the policy's (adapters.moderation.base); they register
in `adapters/__init__.py` and under the entry-point group `safeedit.judges`, so that the CLI,
which does not import `adapters`, finds them too. Each module is imported only when a config
names its kind.
"""
