# Sourced by scripts/test.sh and scripts/bench-moto.sh (from the repository root).
#   test_venv   .venv with the pinned test tools (scripts/requirements-*.txt, from PyPI), on PATH
#   start_moto  moto on a free loopback port (scripts/moto_server.py: moto plus DynamoDB's
#               PartiQL write semantics), exported as FLEET_TEST_AWS_ENDPOINT, stopped on exit

venv="$PWD/.venv"

test_venv() {
  if ! cat scripts/requirements-*.txt | cmp -s - "$venv/.installed" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
    cat scripts/requirements-*.txt >"$venv/.installed"
  fi
  export PATH="$venv/bin:$PATH"
}

start_moto() {
  mkdir -p target
  local port
  port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$venv/bin/python" scripts/moto_server.py -H 127.0.0.1 -p "$port" >target/moto.log 2>&1 &
  moto_pid=$!
  trap 'kill "$moto_pid" 2>/dev/null || true; wait "$moto_pid" 2>/dev/null || true' EXIT
  export FLEET_TEST_AWS_ENDPOINT="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    if "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$FLEET_TEST_AWS_ENDPOINT/moto-api/', timeout=1)" 2>/dev/null; then
      echo "moto at $FLEET_TEST_AWS_ENDPOINT"
      return 0
    fi
    kill -0 "$moto_pid" 2>/dev/null || { cat target/moto.log; return 1; }
    sleep 0.2
  done
  echo "moto did not answer at $FLEET_TEST_AWS_ENDPOINT" >&2
  return 1
}
