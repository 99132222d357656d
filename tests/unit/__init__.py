"""The unit lane: fast tests that start no process and open no network connection (see conftest.py)."""
