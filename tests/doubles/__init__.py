"""Test doubles for services that cannot run on a test machine (see ``spalloc_server``)."""
