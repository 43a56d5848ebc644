"""The predictors directory is code the daemon executes, so it is guarded the way sshd guards authorized_keys.

A file or folder is refused when someone other than its owner and the service's group can write it, or when it is
owned by another unprivileged user (anyone but root and the service's own user).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from ..sources import ApiSource, is_ignored


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def problem(path: Path, uid: int, gid: int) -> str | None:
    """Why the daemon (running as ``uid``/``gid``) must not execute ``path``, with the fix; None when it is safe."""
    try:
        st = path.stat()
    except OSError as e:
        return f"{path}: cannot be checked ({e.strerror})"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, uid):
        return (f"{path}: owned by {_user(st.st_uid)}, not by root or the service user {_user(uid)}; another user "
                f"could change the code the daemon runs. Fix: chown root {path}")
    if mode & stat.S_IWOTH:
        return f"{path}: mode {mode:04o} lets anyone write it. Fix: chmod o-w {path}"
    if mode & stat.S_IWGRP and st.st_gid != gid:
        return (f"{path}: mode {mode:04o} lets group {_group(st.st_gid)} write it, which is not the service's group "
                f"{_group(gid)}. Fix: chmod g-w {path} (or chgrp {_group(gid)} {path})")
    return None


def check_source(source: ApiSource, directory: Path, uid: int | None = None, gid: int | None = None) -> str | None:
    """The first unsafe path among the predictors directory and an API's files and folders, or None."""
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    paths = [directory]
    if source.folder is not None:
        paths.append(source.folder)
        for root, dirs, files in os.walk(source.folder):
            dirs[:] = [d for d in dirs if not is_ignored(d)]
            paths += [Path(root) / d for d in dirs] + [Path(root) / f for f in files if not is_ignored(f)]
    else:
        paths += [p for p in (source.code, source.settings) if p is not None and p.exists()]
    for path in paths:
        found = problem(path, uid, gid)
        if found:
            return found
    return None
