#!/usr/bin/env bash
# The step, compile-time and transformer benchmarks on an accelerator (or any machine) in
# one run, each with prunax's compiler workarounds on and then all off
# (PRUNAX_XLA_WORKAROUNDS_OFF=all, see prunax/_xla_workarounds.py), so the two can be
# compared side by side. Sections run in order of priority and are cut short (timeout) or
# skipped so that the whole run ends within BUDGET seconds; each one's output goes to
# OUT/<section>.txt and, with a summary of what ran, to the console.
#
# Usage, from the repository root:  benchmarks/device.sh OUT [BUDGET]
set -u
out=${1:?usage: benchmarks/device.sh OUT [BUDGET seconds]}
budget=${2:-480}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/core:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)

section() {  # section NAME OFF LIMIT MODULE ARGS...
  local name=$1 off=$2 limit=$3
  shift 3
  local left=$((budget - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "== $name: skipped (${left} s of the budget left)" | tee -a "$out/summary.txt"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name: workarounds off: ${off:-none}; python -m $*" | tee -a "$out/summary.txt"
  local t0=$(date +%s)
  PRUNAX_XLA_WORKAROUNDS_OFF=$off timeout "$limit" "$py" -m "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc $rc in $(($(date +%s) - t0)) s" | tee -a "$out/summary.txt"
  grep -v '^ *$' "$out/$name.txt" | tail -n 40
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null
  "$py" -c 'import jax, optax, flax; print("jax", jax.__version__, "optax", optax.__version__,
"flax", flax.__version__, jax.devices())
import jax.sharding, pkgutil, jax.experimental as e
print("jax.sharding has shard_alike:", hasattr(jax.sharding, "shard_alike"))
print("jax.experimental:", sorted(m.name for m in pkgutil.iter_modules(e.__path__)))'
} 2>&1 | tee "$out/summary.txt"

section steps_on '' 100 benchmarks.run --steps-only --repeats 4
section steps_off all 100 benchmarks.run --steps-only --repeats 4
section transformer_on '' 180 benchmarks.transformer --layouts scanned,unrolled --repeats 1
section compile_on '' 90 benchmarks.compile_time --layers 4,64 --repeats 2
section compile_off all 90 benchmarks.compile_time --layers 4,64 --repeats 2
section transformer_off all 180 benchmarks.transformer --layouts scanned,unrolled --repeats 1
echo "== total $(($(date +%s) - start)) s" | tee -a "$out/summary.txt"
