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


def write_error(error: OSError, path=None) -> KdrunError | None:
    """The one sentence for an OSError a user fixes outside kdrun (a full disk or quota, a read-only or foreign
    folder), naming the file and the fix; None for any other OSError."""
    import errno

    where = path or error.filename or "a file of the run or of the cache"
    fix = "or write runs to another folder (hydra.run.dir) and the cache to another (paths.cache_dir)"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return KdrunError(f"no space left to write {where} ({error.strerror}); free space on that disk, {fix}")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return KdrunError(f"cannot write {where} ({error.strerror}); make it writable, {fix}")
    return None
