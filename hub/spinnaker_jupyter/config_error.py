"""The one error of the deployment config (below config.py and config_secrets.py, which both raise it)."""


class ConfigError(Exception):
    """A config problem an operator can fix; the message says where and how."""
