"""The one error type for bad user input (impossible hyperparameters, mismatched shapes)."""


class ConfigError(ValueError):
    """An impossible hyperparameter or a shape that does not match; the message is one line."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
