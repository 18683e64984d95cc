"""The service tests share the session's Ray head (``ray_head``, ``ray_cluster``:
tests/conftest.py)."""
