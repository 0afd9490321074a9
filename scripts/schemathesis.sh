#!/usr/bin/env bash
# Fuzzes the HTTP API with schemathesis (from PyPI) against a real
# `coatcheck serve`, driven only by its own /openapi.json. Fails (non-zero)
# on any server error (5xx), any response that violates the documented
# schema, any undocumented status code — and on anything that keeps the run
# from happening (no PyPI, no build, server not ready, time budget spent):
# this step never passes silently.
#
#   scripts/schemathesis.sh                 # as CI runs it (.ci/run)
#   SCHEMATHESIS_EXAMPLES=200 SCHEMATHESIS_BUDGET=900 scripts/schemathesis.sh  # a longer hunt
#   SCHEMATHESIS_SEED=123 scripts/schemathesis.sh                              # replay a run's seed
#
# Knobs (env): SCHEMATHESIS_EXAMPLES (cases per operation and phase, 100),
# SCHEMATHESIS_BUDGET (seconds for the run itself, 150), SCHEMATHESIS_SEED,
# COATCHECK_BIN (a server binary to use instead of the workspace build),
# SCHEMATHESIS_STORE (a `--store` URL, e.g. a PostgreSQL schema, instead of
# a temp data directory for the embedded store).
#
# What is not sent: the two SSE routes (`GET …/events`) are excluded — a
# valid call is an endless stream by design, which a request/response fuzzer
# can only time out on; their parsers (`Last-Event-ID`, path, query) are
# fuzzed by crates/server/tests/http/fuzz.rs instead. Valid long-poll waits
# are shortened by scripts/schemathesis_hooks.py (see there).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5 # pinned; bump deliberately
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-100}
BUDGET=${SCHEMATHESIS_BUDGET:-150}
ROOT=target/schemathesis
VENV=$ROOT/venv-$VERSION
WORK=$(mktemp -d "${TMPDIR:-/tmp}/coatcheck-schemathesis.XXXXXX")
SERVER_PID=

fail() {
  echo "schemathesis.sh: error: $*" >&2
  exit 1
}

cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

started=$(date +%s)

# 1. schemathesis, pinned, in a venv cached under target/.
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "$VERSION"; then
  echo "installing schemathesis $VERSION into $VENV"
  rm -rf "$VENV"
  mkdir -p "$ROOT"
  python3 -m venv "$VENV" || fail "python3 -m venv failed (is python3-venv installed?)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION" ||
    fail "could not install schemathesis $VERSION from PyPI (offline or blocked?); the API fuzz step did NOT run"
  "$VENV/bin/schemathesis" --version | grep -qF "$VERSION" ||
    fail "schemathesis $VERSION did not install correctly"
fi

# 2. The server binary: the one the workspace's test build made (after
# `cargo nextest run --workspace` this builds nothing; `cargo build -p
# coatcheck` would build a second variant, without the test build's unified
# features — minutes on a small machine).
BIN=${COATCHECK_BIN:-}
if [ -z "$BIN" ]; then
  BIN=$(cargo test --workspace --no-run --quiet --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if (m.get("reason") == "compiler-artifact" and t.get("name") == "coatcheck"
            and "bin" in t.get("kind", []) and not m["profile"]["test"] and m.get("executable")):
        print(m["executable"])
' | tail -n1) || fail "cargo could not build the workspace"
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || fail "no coatcheck server binary (${BIN:-none found})"

# 3. A real server on a free loopback port, over a fresh data directory.
if [ -n "${SCHEMATHESIS_STORE:-}" ]; then
  store=(--store "$SCHEMATHESIS_STORE")
else
  store=(--data "$WORK/data")
fi
"$BIN" serve --listen 127.0.0.1:0 "${store[@]}" >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
URL=
for _ in $(seq 1 100); do
  URL=$(sed -n 's/^coatcheck ready: listening on \(http[^ ]*\).*/\1/p' "$WORK/server.out" | head -n1)
  [ -n "$URL" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; fail "the server exited before it was ready"; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$WORK/server.log" >&2; fail "the server was not ready within 10 s"; }
echo "server: $URL ($(sed -n 's/^coatcheck ready: listening on [^ ]* (\(.*\))$/\1/p' "$WORK/server.out"))"

# 4. The run: every operation of /openapi.json, every phase, bounded.
args=(
  run "$URL/openapi.json"
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,unsupported_method,allow_header_conformance
  --max-examples "$EXAMPLES"
  --exclude-path-regex '/events$'
  --request-timeout 10
  --generation-database none
  --no-color
)
[ -n "${SCHEMATHESIS_SEED:-}" ] && args+=(--seed "$SCHEMATHESIS_SEED")
set +e
SCHEMATHESIS_HOOKS=scripts/schemathesis_hooks.py \
  timeout --signal=INT --kill-after=10 "$BUDGET" "$VENV/bin/schemathesis" "${args[@]}"
rc=$?
set -e

took=$(($(date +%s) - started))
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  tail -n 50 "$WORK/server.log" >&2
  fail "the server died during the run"
fi
if grep -qE 'panicked|ERROR' "$WORK/server.log"; then
  grep -E 'panicked|ERROR' "$WORK/server.log" | head -n 20 >&2
  fail "the server logged errors or panics during the run"
fi
case $rc in
  0) echo "schemathesis: no failures (${took}s)" ;;
  124 | 130 | 137) fail "the run did not finish within its ${BUDGET}s budget (${took}s in all); lower SCHEMATHESIS_EXAMPLES or raise SCHEMATHESIS_BUDGET" ;;
  *) fail "schemathesis found failures (exit $rc, ${took}s); see above" ;;
esac
