"""``python -m spinnaker_jupyter.access_token_service``: the command the hub runs for the service."""

from .server import main

main()
