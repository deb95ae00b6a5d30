"""The server: OpenAI-compatible `/v1`, the chat web app, the labelers' workbench and admin (docs/serve.md).

flywheel serve runs/sft/final --db feedback.db --port 8000
"""
