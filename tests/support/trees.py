"""What a directory tree holds, to compare two trees (a snapshot and its rootfs, a copy and a
reference) in the agent's tests on this machine's filesystems."""

from __future__ import annotations

import hashlib
import os


def tree_sums(top, links: bool = False, symlink_times: bool = True) -> dict:
    """Every entry under `top`: [contents' SHA-256 (files) or target (symlinks) or "dir", mode,
    uid, gid, mtime, xattrs]. `symlink_times=False`: a symlink's mtime is None. `links`: each
    file also has the sorted names of its hard-link group here."""
    top = str(top)
    out, inodes = {}, {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, top)
            if os.path.islink(p):
                body = "->" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            else:
                body = "dir"
            try:
                xattrs = sorted(
                    (k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False)
                )
            except OSError:
                xattrs = []
            mtime = None if os.path.islink(p) and not symlink_times else st.st_mtime_ns
            out[rel] = [body, st.st_mode, st.st_uid, st.st_gid, mtime, xattrs]
    if links:
        for names in inodes.values():
            for n in names:
                out[n].append(sorted(names))
    return out
