#!/usr/bin/env bash
# CI for android_demo/: compile the Kotlin core + its unit tests with kotlinc, run them on JUnit 5, run the
# end-to-end test against a real `wisp serve` (tiny model), and aapt2-compile/link the app's resources.
#
#   bash android_demo/ci.sh            # everything
#   bash android_demo/ci.sh unit       # compile + unit tests only
#   bash android_demo/ci.sh e2e        # compile + end-to-end only
#   bash android_demo/ci.sh res        # app resources only
#
# Installs what it needs idempotently: Debian packages (apt-get) and kotlinc (npm, into android_demo/.tools/).
# Ends with one `N passed, N failed` line; exits non-zero on any failure.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
STAGES="${1:-all}"
BUILD="$HERE/build"
TOOLS="$HERE/.tools"
PY="${WISP_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WISP=("$PY" -m wisp_sdk.cli)
KOTLIN_VERSION=2.3.20
JAVA_DIR=/usr/share/java
T0=$(date +%s)

PASSED=0
FAILED=0
SERVER_PID=""
log() { printf '[android_demo %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
fail() { log "FAIL: $*"; FAILED=$((FAILED + 1)); }
want() { [ "$STAGES" = all ] || [ "$STAGES" = "$1" ]; }
cleanup() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi; }
trap cleanup EXIT

# ---------------------------------------------------------------- tools
DEBS=(junit5 libandroid-json-java libokhttp-java libokio-java aapt android-framework-res)
missing=()
for p in "${DEBS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { log "apt-get install failed"; exit 1; }
fi
KOTLINC="$TOOLS/node_modules/kotlin-compiler/bin/kotlinc"
KLIB="$TOOLS/node_modules/kotlin-compiler/lib"
if ! grep -qs "\"version\": \"$KOTLIN_VERSION\"" "$TOOLS/node_modules/kotlin-compiler/package.json"; then
    log "installing kotlin-compiler@$KOTLIN_VERSION from npm into $TOOLS"
    mkdir -p "$TOOLS"
    (cd "$TOOLS" && npm install --no-audit --no-fund --silent --no-save "kotlin-compiler@$KOTLIN_VERSION") \
        || { log "npm install kotlin-compiler failed"; exit 1; }
fi

LIBS="$JAVA_DIR/com.android.json.jar:$JAVA_DIR/okhttp.jar:$JAVA_DIR/okio.jar"
JUNIT="$JAVA_DIR/junit-platform-console-standalone.jar"
CORE="$HERE/core"

# ---------------------------------------------------------------- compile (one kotlinc run)
# Compiles :core and its tests, and type-checks the app's Kotlin against :core, the R.java that aapt2 generated
# and the signature stubs in tools/stubs/ (no android.jar or onnxruntime AAR here; kotlinc only reads Java sources
# for symbols, so the app's classes are never run).
compile() {
    if grep -rnE '^import android\.' "$CORE/src/main" >/dev/null; then
        fail "core/src/main imports android.* (the core must stay pure JVM)"
        return 1
    fi
    local rjava="$BUILD/aapt2/gen/dev/wisp/demo/R.java"
    [ -f "$rjava" ] || { fail "no R.java (the aapt2 stage failed)"; return 1; }
    local sources
    sources=$(find "$CORE/src/main/kotlin" "$CORE/src/test/kotlin" "$HERE/app/src/main/kotlin" -name '*.kt' | sort)
    sources="$sources $(find "$HERE/tools/stubs" -name '*.java' | sort) $rjava"
    local stamp
    stamp="$(cat $sources | sha256sum | cut -c1-16)-$KOTLIN_VERSION"
    if [ -f "$BUILD/classes/.stamp" ] && [ "$(cat "$BUILD/classes/.stamp")" = "$stamp" ]; then
        log "sources unchanged since the last compile: reusing build/classes"
        return 0
    fi
    rm -rf "$BUILD/classes"
    mkdir -p "$BUILD/classes"
    log "kotlinc: core + unit tests + app type-check"
    # shellcheck disable=SC2086
    if ! JAVA_OPTS="-Xmx1g -Xss4m" "$KOTLINC" -jvm-target 17 -nowarn \
        -cp "$LIBS:$JUNIT" -d "$BUILD/classes" $sources >"$BUILD/kotlinc.log" 2>&1; then
        cat "$BUILD/kotlinc.log"
        fail "kotlinc"
        return 1
    fi
    echo "$stamp" >"$BUILD/classes/.stamp"
    PASSED=$((PASSED + 1))
    log "kotlinc done (app sources type-check against core)"
}

# Runs the JUnit console; adds its counts to PASSED/FAILED. Extra args select tests.
junit() {
    local name="$1"; shift
    local out="$BUILD/junit-$name.txt"
    java -XX:+UseSerialGC -jar "$JUNIT" --disable-banner --details=tree --disable-ansi-colors \
        -cp "$BUILD/classes:$CORE/src/test/resources:$LIBS:$KLIB/kotlin-stdlib.jar" \
        --reports-dir "$BUILD/junit-$name" "$@" >"$out" 2>&1
    local rc=$?
    cat "$out"
    local ok bad
    ok=$(grep -oE '\[ *[0-9]+ tests successful' "$out" | grep -oE '[0-9]+' | head -1)
    bad=$(grep -oE '\[ *[0-9]+ tests failed' "$out" | grep -oE '[0-9]+' | head -1)
    ok=${ok:-0}; bad=${bad:-0}
    PASSED=$((PASSED + ok)); FAILED=$((FAILED + bad))
    log "junit $name: $ok passed, $bad failed (rc $rc)"
    if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then fail "junit $name exited $rc"; fi
    if [ "$ok" -eq 0 ]; then fail "junit $name ran no test"; fi
}

# ---------------------------------------------------------------- unit tests
unit() {
    log "vectors: committed file matches wisp_sdk"
    if "$PY" "$HERE/tools/make_vectors.py" --check; then PASSED=$((PASSED + 1)); else fail "vectors.json is stale"; fi
    junit unit --scan-classpath "$BUILD/classes" --exclude-tag e2e
}

# ---------------------------------------------------------------- end to end
e2e() {
    local dir="$BUILD/e2e"
    mkdir -p "$dir"
    if [ ! -f "$dir/draft-bundle/wisp-draft.json" ]; then
        log "e2e: building tiny target + draft models and exporting the draft bundle"
        rm -rf "$dir/target" "$dir/draft" "$dir/draft-bundle"
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - "$ROOT/tests" "$dir" <<'EOF' || { fail "e2e: tiny models"; return 1; }
import sys
sys.path.insert(0, sys.argv[1])
from tiny_models import build_tiny_model
d = sys.argv[2]
t = build_tiny_model(d + "/target", arch="qwen2", seed=0)
build_tiny_model(d + "/draft", seed=1, perturb_from=t)
EOF
        HF_HUB_OFFLINE=1 "${WISP[@]}" export --model "$dir/draft" --out "$dir/draft-bundle" --quant none >"$dir/export.log" 2>&1 \
            || { cat "$dir/export.log"; fail "e2e: wisp export"; return 1; }
    fi
    log "e2e: starting wisp serve"
    HF_HUB_OFFLINE=1 "${WISP[@]}" serve --target "$dir/target" --host 127.0.0.1 --port 0 >"$dir/serve.log" 2>&1 &
    SERVER_PID=$!
    local url=""
    for _ in $(seq 1 240); do
        url=$(grep -oE 'listening on ws://[0-9.]+:[0-9]+' "$dir/serve.log" | head -1 | sed 's/listening on //')
        [ -n "$url" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.5
    done
    if [ -z "$url" ]; then cat "$dir/serve.log"; fail "e2e: wisp serve did not start"; return 1; fi
    log "e2e: server at $url; recording the Python SDK run"
    if ! HF_HUB_OFFLINE=1 "$PY" "$HERE/tools/record_e2e.py" --server "$url" --draft "$dir/draft-bundle" \
        --out "$dir/recording.json"; then
        fail "e2e: record_e2e.py"; return 1
    fi
    WISP_E2E_URL="$url" WISP_E2E_RECORDING="$dir/recording.json" junit e2e --select-class dev.wisp.edge.E2eTest
    local skipped
    skipped=$(grep -oE '\[ *[0-9]+ tests skipped' "$BUILD/junit-e2e.txt" | grep -oE '[0-9]+' | head -1)
    [ "${skipped:-0}" -eq 0 ] || fail "e2e: $skipped tests skipped"
    cleanup; SERVER_PID=""
}

# ---------------------------------------------------------------- app resources
resources() {
    local app="$HERE/app/src/main" out="$BUILD/aapt2"
    rm -rf "$out"; mkdir -p "$out"
    log "aapt2: compile + link app resources and manifest against framework-res"
    if ! aapt2 compile --dir "$app/res" -o "$out/res.zip" >"$out/log" 2>&1; then
        cat "$out/log"; fail "aapt2 compile"; return 1
    fi
    # aapt2 wants the package in the manifest; Gradle injects it from `namespace`, so add it for this check.
    sed 's|<manifest |<manifest package="dev.wisp.demo" |' "$app/AndroidManifest.xml" >"$out/AndroidManifest.xml"
    if ! aapt2 link -I /usr/share/android-framework-res/framework-res.apk --manifest "$out/AndroidManifest.xml" \
        --java "$out/gen" -o "$out/app-res.apk" "$out/res.zip" >>"$out/log" 2>&1; then
        cat "$out/log"; fail "aapt2 link"; return 1
    fi
    [ -f "$out/gen/dev/wisp/demo/R.java" ] || { fail "aapt2 link produced no R.java"; return 1; }
    PASSED=$((PASSED + 1))
    log "aapt2: ok ($(grep -c 'public static final int' "$out/gen/dev/wisp/demo/R.java") resource ids)"
}

# aapt2 first: the compile stage type-checks the app against the R.java it generates.
if want res || want unit || want e2e; then resources || true; fi
if want unit || want e2e; then
    if compile; then
        want unit && unit
        want e2e && e2e
    fi
fi

log "done in $(($(date +%s) - T0)) s"
echo "${PASSED} passed, ${FAILED} failed"
[ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
