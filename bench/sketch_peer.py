"""The numpy implementation of recursive sketches a user would otherwise write, timed on the same
work as `cargo bench -p ferry-sketch --bench sketch`: build the sketches of random complete trees and
decode them fully with the per-block least-squares decoder.

Also times generating the module matrices (normals, QR and sign fix), per module.

Prints one JSON object: {"<workload>": {"sketch_us": ..., "decode_us": ..., "objects": ..., "matrix_us": ...}},
for the workloads named on the command line (default: all).
"""
import json
import math
import sys
import time

import numpy as np


class Sketcher:
    def __init__(self, d, k, m, slots, seed):
        rng = np.random.default_rng(seed)
        self.d, self.k, self.m, self.slots = d, k, m, slots
        self.R = np.empty((m, d, k + 1))
        for i in range(m):
            q, r = np.linalg.qr(rng.standard_normal((d, k + 1)))
            self.R[i] = q * np.sign(np.diag(r))
        self.P = self.R[:, :, 0].T.copy()
        self.perm = np.stack([rng.permutation(d) for _ in range(m * slots)]).reshape(m, slots, d)
        self.sign = rng.choice([-1.0, 1.0], size=(m, slots, d))

    def rotate(self, M, j, v):
        out = np.empty_like(v)
        out[self.perm[M, j]] = self.sign[M, j] * v
        return out

    def rotate_t(self, M, j, u):
        return self.sign[M, j] * u[self.perm[M, j]]

    def sketch(self, node):
        M, x, kids = node
        s = self.R[M] @ np.concatenate(([1.0], x))
        for j, a, child in kids:
            s = s + a * self.rotate(M, j, self.sketch(child))
        return s

    def decode(self, u, mask, tau, depth, path=(), out=None):
        out = [] if out is None else out
        scale = self.d / mask.sum()
        p = (self.P[mask].T @ u[mask]) * scale
        M = int(np.argmax(p))
        B = self.R[M][mask]
        z = np.linalg.solve(B.T @ B, B.T @ u[mask])
        if p[M] < tau or z[0] < tau:
            return out
        out.append((path, M, z[0], z[1:] / z[0]))
        if depth == 0:
            return out
        r = u.copy()
        r[mask] -= B @ z
        for j in range(self.slots):
            self.decode(self.rotate_t(M, j, r), self.rotate_t(M, j, mask.astype(float)) != 0, tau, depth - 1, path + (j,), out)
        return out


def tree(rng, m, k, fan, depth):
    x = rng.standard_normal(k)
    x /= np.linalg.norm(x)
    kids = [(j, 1.0 / fan, tree(rng, m, k, fan, depth - 1)) for j in range(fan)] if depth > 0 else []
    return (int(rng.integers(m)), x, kids)


def workload(d, k, m, fan, depth, trees, rounds=7):
    best_m = math.inf
    for r in range(3):
        t0 = time.perf_counter()
        sk = Sketcher(d, k, m, fan, seed=1)
        best_m = min(best_m, time.perf_counter() - t0)
    rng = np.random.default_rng(2)
    forest = [tree(rng, m, k, fan, depth) for _ in range(trees)]
    best_s = best_d = math.inf
    objects = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        sketches = [sk.sketch(t) for t in forest]
        best_s = min(best_s, time.perf_counter() - t0)
        mask = np.ones(d, bool)
        t0 = time.perf_counter()
        objects = 0
        for s in sketches:
            objects += len(sk.decode(s, mask, 4.5 * np.linalg.norm(s) / math.sqrt(d), depth))
        best_d = min(best_d, time.perf_counter() - t0)
    return {
        "sketch_us": best_s / trees * 1e6,
        "decode_us": best_d / trees * 1e6,
        "objects": objects / trees,
        "matrix_us": best_m / m * 1e6,
    }


WORKLOADS = {
    "d1024": (1024, 8, 32, 3, 3, 100),
    "d4096": (4096, 16, 64, 2, 4, 50),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(WORKLOADS)
    json.dump({name: workload(*WORKLOADS[name]) for name in names}, sys.stdout)
    print()
