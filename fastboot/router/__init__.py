"""The router: an OpenAI-compatible front that scales replicas from zero and routes by load."""
