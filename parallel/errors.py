"""The error every layer raises for a request or configuration that cannot run."""


class ConfigError(ValueError):
    """A request or configuration that cannot run; raised before any rank does work."""
