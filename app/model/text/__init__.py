"""The text side of the model: tokens <-> text, prompts, tool calls and grammars (CPU work)."""
