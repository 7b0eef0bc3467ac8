"""Files only the agent's user may read (ExaBGP's config holds the MD5 passwords).

The modes are given when the directory and the file are created (os.mkdir / os.open with a mode), never set by a
chmod afterwards, so there is no moment when either is readable by others. A directory that exists with other
modes, another owner, or as a symlink is not trusted: it is removed and created again (it only ever holds files
this module wrote). Files are written to a fresh temporary name and renamed over the target, so a reader sees
the old or the new text, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str) -> str:
    """`path` as a directory of mode 0700 owned by us (created with that mode; an untrusted one is replaced)."""
    try:
        os.mkdir(path, DIR_MODE)
        return path
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0:
        return path
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    os.mkdir(path, DIR_MODE)
    return path


def write_private(path: str, text: str) -> None:
    """Write `text` to `path` (mode 0600) in a directory made by `private_dir`, atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
