"""The one exception type for mistakes a user can make and fix."""


class KdrunError(Exception):
    """A user-fixable problem; its message is one sentence that names the fix.

    The CLI prints it without a traceback and exits with status 1.
    """


def instantiate(config, *args, **kwargs):
    """`hydra.utils.instantiate`, letting a KdrunError raised inside the target through unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, KdrunError):
            raise e.__cause__ from None
        raise
