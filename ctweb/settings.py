"""ctweb settings: one file, driven by the environment.

The defaults need little configured: SQLite and a private Redis under var/, so `make run`
and `make test` work on a fresh machine (scripts/env.sh gives them a SECRET_KEY file and
scripts/setup.sh the fleet's SSH key). Several web and worker nodes share one PostgreSQL
(DATABASE_URL), one Redis (REDIS_URL, Sentinel allowed), one SECRET_KEY, one SSH key and
one bundle storage: nothing a node needs is kept only on that node.
"""

import json
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from core import redisconf
from core.clientip import parse_networks as _parse_networks

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CTWEB_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)
# The database, sessions, the SSH key and Redis' files live here: for this account only.
os.chmod(VAR_DIR, 0o700)


def _env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).lower() in ("1", "true", "yes", "on")


DEBUG = _env_bool("DEBUG", False)


def _secret_key() -> str:
    # The same on every web node, or a session signed by one is refused by the next: so it
    # comes from configuration (SECRET_KEY, or SECRET_KEY_FILE naming a file that holds it),
    # never made up by a node. Only DEBUG runs without one.
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    if os.environ.get("SECRET_KEY_FILE"):
        try:
            key = Path(os.environ["SECRET_KEY_FILE"]).read_text().strip()
        except OSError as e:
            raise ImproperlyConfigured(f"SECRET_KEY_FILE {os.environ['SECRET_KEY_FILE']}: {e.strerror or e}.") from e
        if key:
            return key
    if DEBUG:
        return "debug-only-not-secret"
    raise ImproperlyConfigured(
        "SECRET_KEY is not set: give every web and worker node the same one (SECRET_KEY, or SECRET_KEY_FILE "
        "naming a file that holds it; `make run` uses var/secret_key)."
    )


SECRET_KEY = _secret_key()
if not DEBUG and len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("SECRET_KEY is too short: use at least 32 random characters.")
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]
# Reverse proxies (addresses or networks, comma-separated) whose X-Forwarded-For is believed:
# only a request whose peer is one of them has its client address taken from that header
# (core/clientip.py). Empty by default: REMOTE_ADDR is the client.
TRUSTED_PROXIES = [str(n) for n in _parse_networks(os.environ.get("TRUSTED_PROXIES", "").split(","))]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "core",
    "ctweb",
    "operations",
    "hosts",
    "containers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "core.middleware.RequestLimitsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "core.middleware.SecurityHeadersMiddleware",
]

ROOT_URLCONF = "ctweb.urls"
ASGI_APPLICATION = "ctweb.asgi.application"
WSGI_APPLICATION = "ctweb.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "core.context_processors.ctweb",
            ]
        },
    }
]

# SQLite by default. Several processes (web, worker threads) write at once, so WAL
# lets readers run beside a writer and IMMEDIATE transactions take the write lock
# up front instead of failing with "database is locked" on lock upgrade.
_sqlite_path = Path(os.environ.get("SQLITE_PATH", VAR_DIR / "ctweb.sqlite3"))
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _sqlite_path,
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": str(_sqlite_path.with_name("test_" + _sqlite_path.name))},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"
# Debug bundles (operations/bundles.py) are written by a worker and served by a web node, so
# with several nodes they belong in shared storage: CTWEB_BUNDLE_STORAGE is a Django storage
# as JSON, e.g. {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {"bucket_name": "ctweb-bundles",
# "endpoint_url": "https://s3.example"}} with django-storages[s3] installed. By default: files
# under var/bundles (one machine, or a shared filesystem mounted there).
try:
    _BUNDLE_STORAGE = json.loads(os.environ.get("CTWEB_BUNDLE_STORAGE") or "null") or {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(VAR_DIR / "bundles"), "directory_permissions_mode": 0o700},
    }
except ValueError as e:
    raise ImproperlyConfigured(f"CTWEB_BUNDLE_STORAGE is not JSON: {e}.") from e
if not isinstance(_BUNDLE_STORAGE, dict) or not isinstance(_BUNDLE_STORAGE.get("BACKEND"), str):
    raise ImproperlyConfigured('CTWEB_BUNDLE_STORAGE must be a JSON object with a "BACKEND".')
# Snapshot exports (and archives uploaded for an import, until their import ends) are kept the
# same way, in storage of their own: CTWEB_EXPORT_STORAGE (JSON, as above), by default var/exports.
try:
    _EXPORT_STORAGE = json.loads(os.environ.get("CTWEB_EXPORT_STORAGE") or "null") or {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": str(VAR_DIR / "exports"),
            "directory_permissions_mode": 0o700,
            "file_permissions_mode": 0o600,
        },
    }
except ValueError as e:
    raise ImproperlyConfigured(f"CTWEB_EXPORT_STORAGE is not JSON: {e}.") from e
if not isinstance(_EXPORT_STORAGE, dict) or not isinstance(_EXPORT_STORAGE.get("BACKEND"), str):
    raise ImproperlyConfigured('CTWEB_EXPORT_STORAGE must be a JSON object with a "BACKEND".')
# The largest export archive ctweb keeps or imports (bytes); an upload larger than this gets 413.
EXPORT_MAX_BYTES = int(os.environ.get("CTWEB_EXPORT_MAX_BYTES") or 16 * 1024**3)
# A kept export's archive is removed this many days after its export ended (hourly, by beat),
# unless an import is reading it; 0 keeps them until someone removes them.
EXPORT_KEEP_DAYS = float(os.environ.get("CTWEB_EXPORT_KEEP_DAYS") or 7)
if EXPORT_KEEP_DAYS < 0:
    raise ImproperlyConfigured("CTWEB_EXPORT_KEEP_DAYS must be 0 (keep) or a number of days.")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
    "bundles": _BUNDLE_STORAGE,
    "exports": _EXPORT_STORAGE,
}
# Production serves what `collectstatic` wrote (setup.sh runs it): hashed names, compressed
# copies, cached for a year by browsers. DEBUG (or CTWEB_PLAIN_STATIC) serves the source files.
_PLAIN_STATIC = DEBUG or _env_bool("CTWEB_PLAIN_STATIC", False)
if _PLAIN_STATIC:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
WHITENOISE_USE_FINDERS = _PLAIN_STATIC

# Request bodies: the largest thing ctweb takes is a container's command (4 KiB) in a small
# JSON object or form, so 256 KiB leaves room and refuses multi-megabyte bodies with 413
# before they are read (core.middleware.RequestLimitsMiddleware; the API's JSON parser reads
# no further either). A reverse proxy in front should set the same limit (nginx:
# client_max_body_size 256k), as Daphne buffers a whole body before Django sees it.
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024
DATA_UPLOAD_MAX_NUMBER_FIELDS = 200

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = _env_bool("HTTPS", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
if SESSION_COOKIE_SECURE:
    # Served over HTTPS by a TLS proxy in front (deploy/nginx-ctweb.conf), which says so; the
    # proxy also sends HSTS.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

# Redis: one server (or one Sentinel-watched master) for the Celery broker, the Channels
# layer and the cache. Without REDIS_URL the project runs its own redis-server on a unix
# socket under var/ (scripts/redis.sh). The forms: core/redisconf.py.
REDIS_SOCKET = VAR_DIR / "redis.sock"
REDIS_URL = os.environ.get("REDIS_URL", f"unix://{REDIS_SOCKET}")
try:
    _REDIS = redisconf.parse(REDIS_URL)
except redisconf.BadRedisURL as e:
    raise ImproperlyConfigured(str(e)) from e


# A websocket's consumer waits for its messages with BZPOPMIN, 5 s at a time (channels_redis),
# while redis-py 8 gives up on any read after 5 s (its default socket timeout): the two raced,
# and an idle socket died after 5 s with "Timeout reading from ..." in daphne's log. The reads
# may take longer than the pop (a dead Redis is still noticed, 15 s later).
REDIS_SOCKET_TIMEOUT_S = 15
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [redisconf.channel_layer_host(_REDIS, REDIS_SOCKET_TIMEOUT_S)],
            "capacity": 1000,
            "expiry": 30,
        },
    }
}

# The longest job (a migration of a big container) must finish inside the broker's
# visibility timeout, or Redis hands the same task to a second worker.
OPERATION_TIMEOUT_S = int(os.environ.get("CTWEB_OPERATION_TIMEOUT", 4 * 3600))
CELERY_BROKER_URL, _broker_options = redisconf.celery_broker(_REDIS)
CELERY_BROKER_TRANSPORT_OPTIONS = {**_broker_options, "visibility_timeout": OPERATION_TIMEOUT_S + 3600}
# Login throttling counts attempts here (core/login.py): shared by every web node.
CACHES = {"default": redisconf.django_cache(_REDIS)}
# Acknowledged on receipt, not late: kombu 5.7 kills the worker ("Unrecoverable error",
# AttributeError in restore_unacked) when the Redis connection drops while a late-acked task
# runs (tests/operations/test_e2e_worker_lost.py). The Operation row is the truth and its claim is a
# compare-and-set, so a starting worker re-queues rows still pending instead (tasks.py).
CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_ALWAYS_EAGER = _env_bool("CELERY_TASK_ALWAYS_EAGER", False)
# A running operation's row is taken for lost (its worker dead) after this many seconds without
# a heartbeat (a job beats every 5 s) when its worker does not answer a ping; the scheduled
# detector looks that often. Another worker then takes it over (operations/runner.py).
OPERATION_LOST_AFTER_S = float(os.environ.get("CTWEB_LOST_AFTER", 60))
if OPERATION_LOST_AFTER_S < 15:
    raise ImproperlyConfigured("CTWEB_LOST_AFTER must be at least 15 (seconds: three missed heartbeats).")
CELERY_BEAT_SCHEDULE = {
    "refresh-container-states": {
        "task": "containers.tasks.refresh_container_states",
        "schedule": float(os.environ.get("CTWEB_REFRESH_INTERVAL", 30)),
        "options": {"expires": 25},
    },
    "retry-waiting-operations": {
        "task": "operations.tasks.retry_waiting_operations",
        "schedule": 10.0,
        "options": {"expires": 9},
    },
    "reprobe-offline-hosts": {
        "task": "hosts.tasks.reprobe_offline_hosts",
        "schedule": float(os.environ.get("CTWEB_REPROBE_TICK", 10)),
        "options": {"expires": 9},
    },
    "run-snapshot-schedules": {
        "task": "containers.tasks.run_snapshot_schedules",
        "schedule": 30.0,
        "options": {"expires": 25},
    },
    "find-lost-operations": {
        "task": "operations.tasks.find_lost_operations",
        "schedule": OPERATION_LOST_AFTER_S,
        "options": {"expires": OPERATION_LOST_AFTER_S - 5},
    },
    "expire-exports": {
        "task": "containers.tasks.expire_exports",
        "schedule": 3600.0,
        "options": {"expires": 3500},
    },
    "checkpoint-canary": {
        "task": "containers.tasks.checkpoint_canary",
        "schedule": 300.0,
        "options": {"expires": 290},
    },
}
# Each running container's checkpointability is checked again (a trial dump) after this many
# hours (containers/handlers.py canary_checks); 0 turns the canary off.
CTWEB_CANARY_HOURS = float(os.environ.get("CTWEB_CANARY_HOURS", 24))
# ...and never within this many minutes of another operation of the container.
CTWEB_CANARY_QUIET_MINUTES = float(os.environ.get("CTWEB_CANARY_QUIET_MINUTES", 10))
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["core.auth.ViewerOrBetter"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["core.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ctweb API",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "core.schema.add_error_responses",
    ],
    "PATH_CONVERTER_OVERRIDES": {"id": {"type": "integer", "minimum": 0, "maximum": 999999999999999999}},
    "ENUM_NAME_OVERRIDES": {
        "HostStatusEnum": "hosts.models.Host.Status",
        "OperationStatusEnum": "containers.models.Operation.Status",
    },
}

# The fleet's SSH key (private, 0600): the same file on every worker and web node. Made once by
# scripts/setup.sh (`manage.py sshkey`) while no host exists; a node without it refuses to start
# once hosts exist (hosts/ssh.py check_key_at_start), it never makes a new one.
SSH_KEY_PATH = Path(os.environ.get("CTWEB_SSH_KEY", VAR_DIR / "ssh" / "id_ed25519"))
SSH_CONNECT_TIMEOUT_S = float(os.environ.get("CTWEB_SSH_TIMEOUT", 10))
# A host link that carries nothing (not even a keepalive's answer) this long is dead.
SSH_DEAD_AFTER_S = float(os.environ.get("CTWEB_SSH_DEAD_AFTER", 30))
# A migration's rootfs delta (sent while the container is down) lists what its source's change
# journal saw since the presync instead of walking the whole tree (hosts/agent/ctweb_agent/
# mjournal.py); off, it walks (as it does whenever the journal cannot vouch for the changes).
MIGRATION_JOURNAL = _env_bool("CTWEB_MIGRATION_JOURNAL", True)
# A post-copy's target relay asks the source for pages ahead of CRIU's lazy-pages daemon and
# answers it from them (hosts/agent/ctweb_agent/prefetch.py); off, CRIU's own requests cross.
PAGE_READ_AHEAD = _env_bool("CTWEB_PAGE_READ_AHEAD", True)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # paramiko logs every failed handshake or dropped link at ERROR, with a traceback, and
    # raises it too: ctweb turns that into the operation's error and the host's status, so
    # paramiko's own lines would only repeat it (and bury real errors in the logs).
    "loggers": {"paramiko": {"level": "CRITICAL"}},
}
