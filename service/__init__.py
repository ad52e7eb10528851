"""A stateful conversation proxy in front of an OpenAI-style chat-completions gateway."""
