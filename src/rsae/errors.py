"""Error types whose message is one line that a job prints as `error: <message>`."""


class ConfigError(ValueError):
    """An impossible hyperparameter or a shape that does not match; the message is one line."""


class NonFiniteError(RuntimeError):
    """A loss, metric or weight that is NaN or infinite (training diverged); the message is one line."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
