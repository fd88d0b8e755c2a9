"""Engine exceptions."""


class EngineError(Exception):
    """Base class for inference-engine errors."""


class EngineFull(EngineError):
    """No room for another session (session count or KV byte bound reached)."""


class ContextTooLong(EngineError):
    """A request needs more positions than the model context or the session's max_len."""
