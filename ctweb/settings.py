"""ctweb settings: one file, driven by the environment.

The defaults need nothing configured: SQLite and a private Redis under var/,
so `make run` and `make test` work on a fresh machine.
"""

import os
import secrets
from pathlib import Path

import dj_database_url

from core.clientip import parse_networks as _parse_networks

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CTWEB_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)
# The database, sessions, the SSH key and Redis' files live here: for this account only.
os.chmod(VAR_DIR, 0o700)


def _env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).lower() in ("1", "true", "yes", "on")


def _secret_key() -> str:
    # A per-install key kept under var/ (mode 0600) unless the environment gives one,
    # so sessions survive restarts without anyone having to configure a secret.
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    path = VAR_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = _env_bool("DEBUG", False)
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
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
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
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

# Redis: one server for the Celery broker and the Channels layer. Without REDIS_URL
# the project runs its own redis-server on a unix socket under var/ (scripts/redis).
REDIS_SOCKET = VAR_DIR / "redis.sock"
REDIS_URL = os.environ.get("REDIS_URL", f"unix://{REDIS_SOCKET}")


def _celery_broker(url: str) -> str:
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://") :]
    return url


CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "capacity": 1000, "expiry": 30},
    }
}

# The longest job (a migration of a big container) must finish inside the broker's
# visibility timeout, or Redis hands the same task to a second worker.
OPERATION_TIMEOUT_S = int(os.environ.get("CTWEB_OPERATION_TIMEOUT", 4 * 3600))
CELERY_BROKER_URL = _celery_broker(REDIS_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": OPERATION_TIMEOUT_S + 3600}
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
CELERY_BEAT_SCHEDULE = {
    "refresh-container-states": {
        "task": "operations.tasks.refresh_container_states",
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
        "schedule": 60.0,
        "options": {"expires": 55},
    },
}
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

# Where the dashboard keeps its own SSH key pair (generated once, private key 0600).
SSH_KEY_PATH = Path(os.environ.get("CTWEB_SSH_KEY", VAR_DIR / "ssh" / "id_ed25519"))
SSH_CONNECT_TIMEOUT_S = float(os.environ.get("CTWEB_SSH_TIMEOUT", 10))
# A host link that carries nothing (not even a keepalive's answer) this long is dead.
SSH_DEAD_AFTER_S = float(os.environ.get("CTWEB_SSH_DEAD_AFTER", 30))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"paramiko": {"level": "WARNING"}},
}
