#!/usr/bin/env bash
# The project's test command (README, CI): prepare the environment, run the default test suite,
# and fail when no test actually ran (an all-skipped run is not a pass).
#   bash tools/run_tests.sh [extra pytest args]     e.g. --runslow, -k golden
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash tools/setup_env.sh
venv="${SPARK3R_VENV:-$repo/.venv}"
report="$(mktemp --suffix=.xml)"
trap 'rm -f "$report"' EXIT
status=0
"$venv/bin/python" -m pytest -q --junitxml="$report" "$@" || status=$?
ran_check=0
"$venv/bin/python" - "$report" <<'PY' || ran_check=1
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
ran = total - skipped
print(f"[run_tests] {ran} tests ran, {skipped} skipped")
sys.exit(0 if ran > 0 else 1)
PY
if [ "$ran_check" -ne 0 ] && [ "$status" -eq 0 ]; then status=1; fi
exit "$status"
