#!/usr/bin/env python3
"""numpy side of bench/cpu: the same GEMMs as xft's CPU backend, timed in the same run.

  python3 bench/numpy_gemm.py --shape M,n,k,E [--reps R]

For one shape (x [M, k] in E equal groups of rows, w [E, n, k], dy [M, n], float32) times, per group
and summed over the groups, the three products of a linear layer with preallocated outputs (out=):
  fwd  y_e  = x_e @ w_e.T
  dx   dx_e = dy_e @ w_e
  dw   dw_e = dy_e.T @ x_e
and prints one JSON line {"fwd": ms, "dx": ms, "dw": ms, "blas": ..., "numpy": version}, the best of
R repetitions. The thread count is the caller's: OPENBLAS_NUM_THREADS (and OMP_NUM_THREADS) in the
environment. "blas" names the BLAS library this process mapped while multiplying (read from
/proc/self/maps), so the figure says which BLAS it is, not which one numpy was built against.
Any failure exits non-zero with the error on stderr.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np


def loaded_blas():
    """The shared libraries of this process that look like a BLAS (after a matmul loaded it), each with
    its folder: Debian maps OpenBLAS and the netlib reference BLAS under the same file name (libblas.so.3,
    through update-alternatives), and only the folder tells them apart (openblas-pthread/ or blas/)."""
    try:
        with open('/proc/self/maps') as f:
            paths = {line.split()[-1] for line in f if '.so' in line}
    except OSError:
        return 'unknown (no /proc/self/maps)'
    blas = sorted({os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p))
                   for p in paths if re.search(r'blas|mkl|blis|armpl|accelerate|atlas', os.path.basename(p), re.I)})
    return ', '.join(blas) or 'none found'


def best_ms(fn, reps):
    fn()  # warm up (pages, threads)
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', required=True, help='M,n,k,E')
    p.add_argument('--reps', type=int, default=5)
    a = p.parse_args()
    M, n, k, E = (int(v) for v in a.shape.split(','))
    if M % E:
        raise SystemExit(f'numpy_gemm.py: M = {M} is not a multiple of E = {E}')
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, k), dtype=np.float32)
    w = rng.standard_normal((E, n, k), dtype=np.float32)
    dy = rng.standard_normal((M, n), dtype=np.float32)
    y = np.empty((M, n), np.float32)
    dx = np.empty((M, k), np.float32)
    dw = np.empty((E, n, k), np.float32)
    g = M // E
    rows = [slice(e * g, (e + 1) * g) for e in range(E)]

    def fwd():
        for e, r in enumerate(rows):
            np.matmul(x[r], w[e].T, out=y[r])

    def bwd_dx():
        for e, r in enumerate(rows):
            np.matmul(dy[r], w[e], out=dx[r])

    def bwd_dw():
        for e, r in enumerate(rows):
            np.matmul(dy[r].T, x[r], out=dw[e])

    out = {name: best_ms(fn, a.reps) for name, fn in (('fwd', fwd), ('dx', bwd_dx), ('dw', bwd_dw))}
    out['blas'] = loaded_blas()
    out['numpy'] = np.__version__
    out['threads'] = os.environ.get('OPENBLAS_NUM_THREADS', 'unset')
    print(json.dumps(out))


if __name__ == '__main__':
    try:
        main()
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - the caller prints it and fails
        print(f'numpy_gemm.py: {type(err).__name__}: {err}', file=sys.stderr)
        sys.exit(1)
