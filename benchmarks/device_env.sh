# The set-up the device scripts share (sourced by device_scaling.sh and device_goals.sh):
# the repository root as working folder, OUT (default benchmarks/results) made, parrun from
# the checkout (that machine has no install), the OpenBLAS variables unset, and the
# interpreter in $py (PYTHON, else python3: the device promises python3; a bare `python` may
# be missing there, or another interpreter).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
py=${PYTHON:-$(command -v python3 || command -v python)}
