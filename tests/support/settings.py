"""The fast tests' settings: the project's, with a secret of their own and in-process caches
(the fast suite needs no Redis; the e2e stack runs ctweb.settings against a real one)."""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-" + "x" * 40)

from ctweb.settings import *  # noqa: E402,F403

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
