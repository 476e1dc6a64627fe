"""voxtral-server: an OpenAI-compatible server for Voxtral."""
