"""What tests share beyond fixtures: running servers, audio and tokenizer fixtures, protocol clients,
fault injection, checks. Fixtures themselves stay in `tests/conftest.py`."""
