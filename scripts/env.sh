# Sourced by setup.sh, run.sh and test.sh: what a single-machine install (`make run`,
# `make test`) uses where a fleet's configuration would give it. A SECRET_KEY of its own
# under var/ (0600, made once) unless SECRET_KEY or SECRET_KEY_FILE is set; a fleet gives
# every node the same one (deploy/).
VAR=${CTWEB_VAR_DIR:-$PWD/var}
if [ -z "${SECRET_KEY:-}" ] && [ -z "${SECRET_KEY_FILE:-}" ]; then
  mkdir -p "$VAR" && chmod 700 "$VAR"
  if [ ! -s "$VAR/secret_key" ]; then
    tmp=$(mktemp "$VAR/.secret_key.XXXXXX")
    head -c 48 /dev/urandom | base64 -w0 | tr '+/' '-_' > "$tmp"
    ln "$tmp" "$VAR/secret_key" 2>/dev/null || true  # another run made it first: keep that one
    rm -f "$tmp"
  fi
  export SECRET_KEY_FILE="$VAR/secret_key"
fi
