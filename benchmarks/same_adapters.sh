#!/usr/bin/env bash
# Behaviour unchanged by a refactor: `generate` on a sample of suite tasks with --check 0, --check 16, --refine 16 and
# a gradient search checked, by the commit BEFORE (a git worktree) and by this checkout; prints the sha256 (first 16
# hex) of each adapter's adapter_model.safetensors and adapter_config.json, and fails if any differ.
# Usage: benchmarks/same_adapters.sh BEFORE_COMMIT   (about 4 minutes on 2 cores)
set -euo pipefail
before=${1:?usage: benchmarks/same_adapters.sh BEFORE_COMMIT}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/before" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$root" worktree add -q --detach "$work/before" "$before"
status=0
for task in countries_capital_to_country morphology_past_participle; do
  for mode in "--check 0" "--check 16" "--refine 16" "--refine 8 --refine-method gradient --refine-steps 4 --check 8"; do
    line="$task | $mode |"
    sums=()
    for src in "$work/before/src" "$root/src"; do
      out="$work/out/$(echo "$src$task$mode" | sha256sum | cut -c1-12)"
      PYTHONPATH=$src LORAMIX_PROGRESS=0 "$root/.venv/bin/python" -c "from loramix.cli import main; main()" generate \
        --bank default --data "$root/src/loramix/default/suite/$task/train.jsonl" --out "$out" $mode >/dev/null
      sums+=("$(sha256sum "$out/adapter_model.safetensors" | cut -c1-16) $(sha256sum "$out/adapter_config.json" | cut -c1-16)")
    done
    [ "${sums[0]}" = "${sums[1]}" ] && echo "$line ${sums[1]} | same" || { echo "$line ${sums[0]} -> ${sums[1]} | DIFFERENT"; status=1; }
  done
done
exit $status
