"""Loops over a CSR batch's non-zeros, compiled with numba where it is installed.

A sparse linear step touches each non-zero a few times, each time at a random feature: gathers
and scatters. As separate torch ops each is one pass over the batch at ~3 ns a non-zero on this
2-core CPU (index_select, index_add_, index_put_: 0.5-0.9 ms for 164 k non-zeros), and a step
of FTRL with its state takes about twenty of them. Here the same step is one loop, over a
state laid out feature by feature (`(n_features, 2)`: one fetch brings all of a feature's
numbers), which is what makes the sparse path fast on the CPU.

The plain linear score and its gradient (`csr_matvec`, `csr_rmatvec`) fall back to torch index
ops on CUDA and without numba (`pip install largeml[sparse]` adds it), with the same numbers.
FTRL's compiled loop goes row by row (`ftrl_rows`), as the paper and Vowpal Wabbit do: a row's
features are updated right after its score is read, while their state is still in the cache.
`ftrl_pieces` is the same loop over rows read in place from the shards' memory maps
(`largeml.data.stream.RowPieces`), which is how the Trainer streams FTRL's batches on the CPU;
`linear_pieces` sums f and ∇f over such rows for the objective pass, and `linear_scores` scores
them, on every core (numba's `prange`: each core its own rows, and its own gradient).
Its torch form (`ftrl_scores`, `ftrl_update`) takes
one step per batch, for the GPU, whose threads want whole batches.
"""

import math
import mmap

import numpy as np
import torch
from torch import Tensor

from largeml import losses

try:
    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
except ImportError:  # the torch forms do the same work, slower
    numba = None

# Columns of the FTRL state: z (the lazily regularised gradient sum) and √n (the root of the
# sum of squared gradients, stored as a root so that a score costs no square root): 8 bytes a
# feature, side by side, the feature's scale read from the model's input map only when it
# scales. (A bare per-row loop ran 9.6 ns a non-zero over a compact 4-byte state and 13.7 ns
# over a padded 16-byte one: a step's time follows the state's footprint.)
Z, ROOT = range(2)
WIDTH = 2
HUGE_PAGE = 2 << 20  # bytes in one of Linux's transparent huge pages (x86-64, arm64)


def available(x: Tensor) -> bool:
    """Whether the compiled loops can take this batch: numba present, on the CPU."""
    return numba is not None and x.device.type == "cpu"


# The losses the compiled FTRL loop knows (`LOSSES[loss_fn]`): it needs each row's loss and its
# derivative in the loop, between the row's score and its update.
BCE, HINGE, SQUARED_HINGE = range(3)
TINY = 1e-30
NO_ROWS = np.empty(0, np.float32)  # an array argument a loop is given and never reads
LOSSES = {losses.bce: BCE, losses.hinge: HINGE, losses.squared_hinge: SQUARED_HINGE}


def loss_code(loss_fn) -> int | None:
    """The compiled loops' code for `loss_fn` (a loss function, or a `functools.partial` of one
    with no arguments bound but `multiclass`, which one score a row ignores), None for a loss
    they do not know."""
    if set(getattr(loss_fn, "keywords", None) or ()) - {"multiclass"}:
        return None
    return LOSSES.get(getattr(loss_fn, "func", loss_fn))


if numba is not None:
    # fastmath without `reassoc`: reassociation lets LLVM vectorise a row's sum into AVX2
    # gathers, which ran 4x slower than one load a non-zero here (a CSR dot product over
    # 40 M non-zeros: 0.25 s against 0.063 s).
    _jit = numba.njit(cache=True, nogil=True, fastmath={"nsz", "arcp", "contract", "afn"})
    _jit_lanes = numba.njit(cache=True, nogil=True, parallel=True,
                            fastmath={"nsz", "arcp", "contract", "afn"})
    # inlined in numba's IR where it is called: helpers like it as plain calls (each array
    # passed by value, its references counted) made the loops calling them 1.2-2x slower here
    _jit_inline = numba.njit(cache=True, nogil=True, inline="always",
                             fastmath={"nsz", "arcp", "contract", "afn"})

    @intrinsic
    def _prefetch(typingctx, array, i):  # pragma: no cover
        """Asks the CPU to fetch the cache line of `array[i]` (`array[i, 0]` for a 2-d array)
        while the loop goes on: the next row's features are random places in a state of many
        MiB, and a plain load of each, when the row comes, waits for it (LLVM's prefetch, for
        writing and with high locality: the loops update what they read)."""
        def codegen(context, builder, signature, args):
            kind = signature.args[0]
            index = [args[1]] + [context.get_constant(types.intp, 0)] * (kind.ndim - 1)
            pointer = cgutils.get_item_pointer(context, builder, kind,
                                               context.make_array(kind)(context, builder, args[0]),
                                               index, wraparound=False, boundscheck=False)
            byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            function = builder.module.declare_intrinsic(
                "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(),
                                                      [byte_pointer.type, i32, i32, i32]))
            builder.call(function, [byte_pointer, ir.Constant(i32, 1), ir.Constant(i32, 3),
                                    ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(array, types.intp), codegen

    @_jit
    def _prefetch_row(crow, cols, r, array):  # pragma: no cover
        """Prefetches `array`'s entries for the features of row r, if there is a row r."""
        if r < len(crow) - 1:
            for i in range(crow[r], crow[r + 1]):
                _prefetch(array, cols[i])

    @_jit
    def _weight(z, root, alpha, beta, decay):  # pragma: no cover
        # −z / ((β + √n)/α + decay), one division and no branch; TINY keeps 0/0 away from a
        # feature never seen (z = 0, √n = 0) when β and decay are 0
        return -z * alpha / (beta + root + alpha * decay + TINY)

    @_jit
    def _loss(loss, s, y):  # pragma: no cover
        """(the row's loss, its derivative in the score) for loss BCE, HINGE or SQUARED_HINGE."""
        t = 2.0 * y - 1.0
        m = t * s
        if loss == 0:  # log(1 + exp(−m)), stably; d = σ(s) − y; one exp: |m| = |s|
            e = math.exp(-abs(s))
            return max(-m, 0.0) + math.log1p(e), (1.0 if s >= 0 else e) / (1.0 + e) - y
        if loss == 1:
            return max(1.0 - m, 0.0), (-t if m < 1.0 else 0.0)
        return max(1.0 - m, 0.0) ** 2, -2.0 * t * max(1.0 - m, 0.0)

    @intrinsic
    def _address(typingctx, address):  # pragma: no cover
        """The integer `address` as a pointer, for `numba.carray`: how a loop reads arrays it
        is given by address (`_shard_arrays`), since numba's own lists of arrays compile their
        methods anew in every process (0.2-0.5 s for each kind of array)."""
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.intp), codegen

    @_jit
    def _shard_arrays(addresses, lengths, shard):  # pragma: no cover
        """Shard `shard`'s indptr, indices and values, from their addresses and lengths."""
        return (numba.carray(_address(addresses[shard, 0]), lengths[shard, 0], np.int64),
                numba.carray(_address(addresses[shard, 1]), lengths[shard, 1], np.int32),
                numba.carray(_address(addresses[shard, 2]), lengths[shard, 2], np.float32))

    @_jit_inline
    def _ftrl_row(indptr, cols, vals, r, y, t, state, scale, scaled, bias, alpha, beta, l2, l1,
                  loss, weights, a, inv_a, one):  # pragma: no cover
        """FTRL on row r of (indptr, cols, vals), label y, after t rows: its score, its loss
        `loss` (returned), its update of `state` and `bias` (z, √n). `weights`: scratch of at
        least the row's length (its weights, read once)."""
        decay = l2 * t
        den = np.float32(beta + alpha * decay + TINY)  # w = −z·α / (√n + β + α·decay)
        shrink = np.float32(l1 * t)  # L1: z soft-thresholded by λ1·t
        s = _weight(bias[0], bias[1], alpha, beta, 0.0)
        lo, hi = indptr[r], indptr[r + 1]
        for i in range(lo, hi):
            c = cols[i]
            z = state[c, 0]
            w = -(z - min(max(z, -shrink), shrink)) * a / (state[c, 1] + den)
            weights[i - lo] = w
            s += w * (scale[c] if scaled else one) * vals[i]
        value, d = _loss(loss, s, y)
        if d != 0.0:  # else nothing to learn from this row; its L2 is in `decay`
            # The row's features were just read: their state is in the cache for the update.
            # (A feature twice in a row: its second update starts from the first's state but
            # with the weight the score was taken at, as a batch step would.)
            d32 = np.float32(d)
            for i in range(lo, hi):
                c = cols[i]
                g = d32 * (scale[c] if scaled else one) * vals[i]
                root = state[c, 1]
                root_new = np.sqrt(root * root + g * g)
                state[c, 0] += g - (root_new - root) * inv_a * weights[i - lo]
                state[c, 1] = root_new
            w = _weight(bias[0], bias[1], alpha, beta, 0.0)
            root_new = math.sqrt(bias[1] * bias[1] + d * d)
            bias[0] += d - (root_new - bias[1]) / alpha * w
            bias[1] = root_new
        return value

    @_jit
    def _longest_row(pieces, addresses, lengths):  # pragma: no cover
        """The most non-zeros in one of the rows of pieces."""
        longest = 0
        for p in range(len(pieces)):
            indptr = _shard_arrays(addresses, lengths, pieces[p, 0])[0]
            for r in range(pieces[p, 1], pieces[p, 2]):
                longest = max(longest, indptr[r + 1] - indptr[r])
        return longest

    @_jit
    def _ftrl_pieces(pieces, addresses, lengths, y, state, scale, scaled, bias, alpha, beta, l2,
                     l1, rows_before, loss, out):  # pragma: no cover
        # FTRL on the rows of each piece (shard, first row, end row) in order, where they lie in
        # the shards' arrays (`_shard_arrays`): row k of the batch is y[k], out[k]. (The row's
        # work is `_ftrl_row`'s, written out again: through that inlined helper this loop ran
        # 7-10 % slower on the click set of scripts/bench_sparse.py, the same numbers.)
        weights = np.empty(_longest_row(pieces, addresses, lengths), np.float32)  # read once
        # float32 arithmetic over the non-zeros (the state's own precision): 25 % faster a step
        # than float64 here; a row's score and loss are float64.
        a, inv_a, one = np.float32(alpha), np.float32(1.0 / alpha), np.float32(1.0)
        k = 0
        for p in range(len(pieces)):
            indptr, cols, vals = _shard_arrays(addresses, lengths, pieces[p, 0])
            rows = indptr[:pieces[p, 2] + 1]  # the piece's rows, and none after them
            for r in range(pieces[p, 1], pieces[p, 2]):
                # The next row's state is fetched while this one is learnt: 1.7x faster a step
                # here over 2 M features (16 MiB of state), the same numbers.
                _prefetch_row(rows, cols, r + 1, state)
                t = rows_before + k
                decay = l2 * t
                den = np.float32(beta + alpha * decay + TINY)  # w = −z·α / (√n + β + α·decay)
                shrink = np.float32(l1 * t)  # L1: z soft-thresholded by λ1·t
                s = _weight(bias[0], bias[1], alpha, beta, 0.0)
                lo, hi = indptr[r], indptr[r + 1]
                for i in range(lo, hi):
                    c = cols[i]
                    z = state[c, 0]
                    w = -(z - min(max(z, -shrink), shrink)) * a / (state[c, 1] + den)
                    weights[i - lo] = w
                    s += w * (scale[c] if scaled else one) * vals[i]
                out[k], d = _loss(loss, s, y[k])
                k += 1
                if d == 0.0:
                    continue  # nothing to learn from this row; its L2 is in `decay`
                # The row's features were just read: their state is in the cache for the
                # update. (A feature twice in a row: its second update starts from the first's
                # state but with the weight the score was taken at, as a batch step would.)
                d32 = np.float32(d)
                for i in range(lo, hi):
                    c = cols[i]
                    g = d32 * (scale[c] if scaled else one) * vals[i]
                    root = state[c, 1]
                    root_new = np.sqrt(root * root + g * g)
                    state[c, 0] += g - (root_new - root) * inv_a * weights[i - lo]
                    state[c, 1] = root_new
                w = _weight(bias[0], bias[1], alpha, beta, 0.0)
                root_new = math.sqrt(bias[1] * bias[1] + d * d)
                bias[0] += d - (root_new - bias[1]) / alpha * w
                bias[1] = root_new

    @_jit
    def _linear_rows(crow, cols, vals, y, wg, scale, scaled, bias, loss):  # pragma: no cover
        # wg: (n_features, 2), each feature's weight beside its gradient: one cache line a
        # non-zero, where a weight and a gradient in two arrays cost two (over 2 M features
        # here: 18-21 against 31-34 ns a non-zero)
        total, bias_grad = 0.0, 0.0
        for r in range(len(crow) - 1):
            _prefetch_row(crow, cols, r + 1, wg)
            s = bias
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                s += wg[c, 0] * (scale[c] if scaled else 1.0) * vals[i]
            value, d = _loss(loss, s, y[r])
            total += value
            bias_grad += d
            if d != 0.0:
                for i in range(crow[r], crow[r + 1]):
                    c = cols[i]
                    wg[c, 1] += d * (scale[c] if scaled else 1.0) * vals[i]
        return total, bias_grad

    @_jit
    def _rows_of(pieces, n):  # pragma: no cover
        """Row k of a batch of pieces as (shard, row): where[k]."""
        where = np.empty((n, 2), np.int64)
        k = 0
        for p in range(len(pieces)):
            for r in range(pieces[p, 1], pieces[p, 2]):
                where[k, 0], where[k, 1] = pieces[p, 0], r
                k += 1
        return where

    @_jit_inline
    def _walk(where, k, end, addresses, lengths, shard, arrays, target):  # pragma: no cover
        """(shard, its arrays) for row k of a batch of pieces (`where`, `_rows_of`), given those
        of the row before, having prefetched row k + 1's entries of `target` if it is < end."""
        if where[k, 0] != shard:  # the next piece
            shard = where[k, 0]
            arrays = _shard_arrays(addresses, lengths, shard)
        if k + 1 < end:
            following = (arrays if where[k + 1, 0] == shard
                         else _shard_arrays(addresses, lengths, where[k + 1, 0]))
            _prefetch_row(following[0], following[1], where[k + 1, 1], target)
        return shard, arrays

    @_jit_inline
    def _lane(where, n, lane, lanes, addresses, lengths):  # pragma: no cover
        """Lane `lane`'s run of the n rows of a batch of pieces (`where`, `_rows_of`), the
        lane-th of `lanes`, as (first row, end row, its first row's shard, that shard's
        arrays), for `_walk` to go on from."""
        lo_k, hi_k = n * lane // lanes, n * (lane + 1) // lanes
        shard = where[min(lo_k, n - 1), 0] if n > 0 else 0  # (no rows: nothing is read)
        return lo_k, hi_k, shard, _shard_arrays(addresses, lengths, shard)

    @_jit_lanes
    def _ftrl_lanes(pieces, addresses, lengths, y, state, scale, scaled, bias, alpha, beta, l2,
                    l1, rows_before, loss, out, lanes):  # pragma: no cover
        # `_ftrl_pieces` on `lanes` cores at once, Hogwild (Niu et al. 2011): lane l learns the
        # l-th of `lanes` runs of the batch's rows, in order, from the one shared state, which
        # each lane reads and writes without locks. Where two lanes update a feature at the
        # same moment, one update can be lost or read half-done: rare where the features are
        # many and each row's are few, and what makes the numbers depend on the threads'
        # timing. Each lane keeps its own bias (z, √n) from the batch's start, as every row
        # writes it; their changes are added at the batch's end (z and n are sums).
        n = len(y)
        where = _rows_of(pieces, n)
        longest = _longest_row(pieces, addresses, lengths)
        own = np.empty((lanes, 16))  # 128 bytes a lane, so no cache line is shared: with
        # the lanes' biases side by side, the uniform set's epoch took 0.24 s, here 0.21 s
        for lane in range(lanes):
            own[lane, 0], own[lane, 1] = bias[0], bias[1]
        a, inv_a, one = np.float32(alpha), np.float32(1.0 / alpha), np.float32(1.0)
        for lane in numba.prange(lanes):
            lo_k, hi_k, shard, arrays = _lane(where, n, lane, lanes, addresses, lengths)
            mine, scratch = own[lane], np.empty(longest, np.float32)
            for k in range(lo_k, hi_k):
                shard, arrays = _walk(where, k, hi_k, addresses, lengths, shard, arrays, state)
                indptr, cols, vals = arrays
                out[k] = _ftrl_row(indptr, cols, vals, where[k, 1], y[k], rows_before + k,
                                   state, scale, scaled, mine, alpha, beta, l2, l1, loss,
                                   scratch, a, inv_a, one)
        z, n_sum = bias[0], bias[1] * bias[1]
        for lane in range(lanes):
            z += own[lane, 0] - bias[0]
            n_sum += own[lane, 1] * own[lane, 1] - bias[1] * bias[1]
        bias[0], bias[1] = z, math.sqrt(max(n_sum, 0.0))

    @_jit_lanes
    def _max_abs_pieces(pieces, addresses, lengths, own):  # pragma: no cover
        # own[l, c] = max(own[l, c], |x_ic|) over lane l's run of the rows of pieces (the l-th
        # of len(own), as `_linear_pieces` splits them): each lane reads only its own rows and
        # writes only its own maxima. (Lanes that each read every non-zero and kept the
        # features of their own range took 0.14 s over the uniform set of
        # scripts/bench_sparse.py, this 0.06 s; a store every non-zero, not a branch.)
        n = 0
        for p in range(len(pieces)):
            n += pieces[p, 2] - pieces[p, 1]
        if n == 0:
            return
        lanes = own.shape[0]
        where = _rows_of(pieces, n)
        for lane in numba.prange(lanes):
            lo_k, hi_k, shard, arrays = _lane(where, n, lane, lanes, addresses, lengths)
            mine = own[lane]
            for k in range(lo_k, hi_k):
                shard, arrays = _walk(where, k, hi_k, addresses, lengths, shard, arrays, mine)
                indptr, cols, vals = arrays
                r = where[k, 1]
                for i in range(indptr[r], indptr[r + 1]):
                    c = cols[i]
                    mine[c] = max(mine[c], abs(vals[i]))

    @_jit_lanes
    def _linear_pieces(pieces, addresses, lengths, y, own, scale, scaled, bias, loss, sums,
                       curvature):  # pragma: no cover
        # `_linear_rows` over the rows of pieces (as `_ftrl_pieces` reads them), split among
        # the lanes, one a thread: lane l takes the l-th of len(own) runs of the batch's rows,
        # with own[l] its own copy of w (column 0) beside its own gradient (column 1: one
        # cache line a non-zero, as in `_linear_rows`), and adds its loss sum and its bias
        # gradient into sums[l, :2]. No lane writes what another reads. With a column 2 (a
        # Newton solver's (n, 4), the pad keeping a feature in one cache line), also each
        # feature's Σ loss″·x² into it, Σ loss″ into sums[l, 2], and each row's loss″ into
        # curvature[k] unless that is empty.
        n = len(y)
        lanes = own.shape[0]
        second = own.shape[2] > 2
        kept = len(curvature) > 0
        where = _rows_of(pieces, n)
        for lane in numba.prange(lanes):
            lo_k, hi_k, shard, arrays = _lane(where, n, lane, lanes, addresses, lengths)
            mine = own[lane]
            total, bias_grad, bias_curv = 0.0, 0.0, 0.0
            for k in range(lo_k, hi_k):
                shard, arrays = _walk(where, k, hi_k, addresses, lengths, shard, arrays, mine)
                indptr, cols, vals = arrays
                r = where[k, 1]
                # (the row's work is `_linear_rows`'s, written out again: as one inlined helper
                # for both, `_linear_rows` ran 10-35 % slower here, as a plain call 1.2-2x)
                s = bias
                for i in range(indptr[r], indptr[r + 1]):
                    c = cols[i]
                    s += mine[c, 0] * (scale[c] if scaled else 1.0) * vals[i]
                value, d = _loss(loss, s, y[k])
                h = _curvature(loss, s, y[k]) if second else 0.0
                if kept:
                    curvature[k] = h
                total += value
                bias_grad += d
                bias_curv += h
                if d != 0.0 or h != 0.0:
                    for i in range(indptr[r], indptr[r + 1]):
                        c = cols[i]
                        x = (scale[c] if scaled else 1.0) * vals[i]
                        mine[c, 1] += d * x
                        if second:
                            mine[c, 2] += h * x * x
            sums[lane, 0] += total
            sums[lane, 1] += bias_grad
            if second:
                sums[lane, 2] += bias_curv

    @_jit_lanes
    def _linear_scores(pieces, addresses, lengths, w, scale, scaled, bias, out,
                       lanes):  # pragma: no cover
        # each row's x·(scale ⊙ w) + bias, for the rows of pieces, split among the lanes
        n = len(out)
        where = _rows_of(pieces, n)
        for lane in numba.prange(lanes):
            lo_k, hi_k, shard, arrays = _lane(where, n, lane, lanes, addresses, lengths)
            for k in range(lo_k, hi_k):
                shard, arrays = _walk(where, k, hi_k, addresses, lengths, shard, arrays, w)
                indptr, cols, vals = arrays
                r = where[k, 1]
                s = 0.0
                for i in range(indptr[r], indptr[r + 1]):
                    c = cols[i]
                    s += w[c] * (scale[c] if scaled else 1.0) * vals[i]
                out[k] = s + bias

    @_jit
    def _curvature(loss, s, y):  # pragma: no cover
        """The loss's second derivative in the score (its generalised one for SQUARED_HINGE,
        as LIBLINEAR takes it), for loss BCE or SQUARED_HINGE."""
        if loss == 0:  # σ(s)·(1 − σ(s)), from exp(−|s|)
            e = math.exp(-abs(s))
            return e / ((1.0 + e) * (1.0 + e))
        return 2.0 if (2.0 * y - 1.0) * s < 1.0 else 0.0

    @_jit_lanes
    def _newton_hvp(pieces, addresses, lengths, y, own, scale, scaled, bias, bias_v, loss,
                    curvature, sums):  # pragma: no cover
        # Σ_i x_i·loss″(s_i)·(x_i·v + v_bias) over the rows of pieces, split among the lanes:
        # own[l] is lane l's v (column 0, read) beside its part of the product (column 1, added
        # to); loss″ a row is curvature[k], kept from the pass at the point, or where that is
        # empty is computed from the row's score with w (column 2, read).
        n = len(y)
        lanes = own.shape[0]
        kept = len(curvature) > 0
        where = _rows_of(pieces, n)
        for lane in numba.prange(lanes):
            lo_k, hi_k, shard, arrays = _lane(where, n, lane, lanes, addresses, lengths)
            mine = own[lane]
            bias_part = 0.0
            for k in range(lo_k, hi_k):
                shard, arrays = _walk(where, k, hi_k, addresses, lengths, shard, arrays, mine)
                indptr, cols, vals = arrays
                r = where[k, 1]
                s, u = bias, bias_v
                for i in range(indptr[r], indptr[r + 1]):
                    c = cols[i]
                    x = (scale[c] if scaled else 1.0) * vals[i]
                    u += mine[c, 0] * x
                    if not kept:
                        s += mine[c, 2] * x
                q = (curvature[k] if kept else _curvature(loss, s, y[k])) * u
                bias_part += q
                if q != 0.0:
                    for i in range(indptr[r], indptr[r + 1]):
                        c = cols[i]
                        mine[c, 1] += q * (scale[c] if scaled else 1.0) * vals[i]
            sums[lane, 0] += bias_part

    @_jit
    def _newton_hessian(pieces, addresses, lengths, y, w, scale, scaled, bias, loss,
                        h):  # pragma: no cover
        # Σ_i loss″(s_i)·z_i·z_iᵀ into h, z_i = [x_i, 1] (the bias last): for narrow data
        k = 0
        last = h.shape[0] - 1
        for p in range(len(pieces)):
            indptr, cols, vals = _shard_arrays(addresses, lengths, pieces[p, 0])
            for r in range(pieces[p, 1], pieces[p, 2]):
                lo, hi = indptr[r], indptr[r + 1]
                s = bias
                for i in range(lo, hi):
                    s += w[cols[i]] * (scale[cols[i]] if scaled else 1.0) * vals[i]
                q = _curvature(loss, s, y[k])
                k += 1
                h[last, last] += q
                for i in range(lo, hi):
                    xi = q * (scale[cols[i]] if scaled else 1.0) * vals[i]
                    h[cols[i], last] += xi
                    h[last, cols[i]] += xi
                    for j in range(lo, hi):
                        h[cols[i], cols[j]] += xi * (scale[cols[j]] if scaled else 1.0) * vals[j]

    # without fastmath: IEEE arithmetic, the torch forms' formulas (to rounding)
    _jit_exact = numba.njit(cache=True, nogil=True)

    @_jit_exact
    def _ftrl_weights(state, alpha, beta, decay, shrink, out):  # pragma: no cover
        a, b, dec, lim = np.float32(alpha), np.float32(beta), np.float32(decay), \
            np.float32(shrink)
        for c in range(len(out)):
            z = state[c, 0]
            if shrink != 0.0:
                z = z - min(max(z, -lim), lim)
            out[c] = 0.0 if z == 0.0 else -(z / ((state[c, 1] + b) / a + dec))

    @_jit_exact
    def _binned(values, lo, hi, counts):  # pragma: no cover
        # (Σv, Σv²) in float64, each value counted in its bin of `counts` (equal bins from lo
        # to hi, hi in the last), as np.histogram's arithmetic does
        bins = len(counts)
        width = (hi - lo) / bins
        total, squares = 0.0, 0.0
        for v32 in values:
            v = np.float64(v32)
            total += v
            squares += v * v
            k = min(int((v - lo) / width), bins - 1)
            counts[k] += 1
        return total, squares

    @_jit
    def _csr_matvec(crow, cols, vals, w, scale, scaled, bias, out):  # pragma: no cover
        for r in range(len(crow) - 1):
            _prefetch_row(crow, cols, r + 1, w)
            s = 0.0
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                s += w[c] * (scale[c] if scaled else 1.0) * vals[i]
            out[r] = s + bias

    @_jit
    def _csr_rmatvec(crow, cols, vals, d, scale, scaled, out):  # pragma: no cover
        for r in range(len(crow) - 1):
            _prefetch_row(crow, cols, r + 1, out)
            dr = d[r]
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                out[c] += dr * (scale[c] if scaled else 1.0) * vals[i]


def zeros_on_huge_pages(*shape: int) -> Tensor:
    """float32 zeros of `shape` on the CPU, in memory that Linux is asked to map with 2 MiB pages
    (madvise MADV_HUGEPAGE; elsewhere, or under 2 MiB, plain `torch.zeros`). For a state read at
    random features, such as FTRL's: with 4 KiB pages most reads of a 16 MiB state also miss
    the TLB (torch allocates with plain pages; this Linux gives large ones only where asked):
    an FTRL epoch over the uniform set of scripts/bench_sparse.py took 0.573 s through the CLI,
    against 0.537 s on large pages."""
    count = math.prod(shape)
    if 4 * count < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape)
    # Fresh anonymous memory reads as zeros; one spare large page of room to start on a
    # boundary (the pages before it are never touched, so never backed).
    area = mmap.mmap(-1, -(-4 * count // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE,
                     flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (shared: no large pages)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without them (EINVAL): plain pages, the same zeros
        pass
    start = -np.frombuffer(area, np.uint8, count=1).ctypes.data % HUGE_PAGE
    # (the tensor holds a reference to `area`, which lives as long as it does)
    return torch.frombuffer(area, dtype=torch.float32, count=count, offset=start).view(shape)


def lanes() -> int:
    """How many cores the compiled loops that split rows among cores use here (`set_threads`)."""
    return numba.get_num_threads() if numba is not None else 1


def set_threads(n: int) -> None:
    """How many threads (and lanes) the compiled loops that split rows among cores use in this
    thread: this process's share of the cores (numba would take them all). Torch's intra-op
    threads stay as they were: numba's OpenMP layer runs on torch's OpenMP runtime, where its
    count would become torch's too (an FTRL run set to one torch thread ran every small torch
    op of its steps on two, and OpenMP's spinning worker took the second core from the
    checkpoint writer: the training thread lost 4-16 ms at a time while a checkpoint was
    written)."""
    if numba is not None:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        torch.set_num_threads(torch_threads)


def _parts(x: Tensor):
    return x.crow_indices().numpy(), x.col_indices().numpy(), x.values().numpy()


def _scale(scale: Tensor | None, placeholder: Tensor) -> tuple:
    """(array, whether to read it) for a loop's `scale`: None is all ones, never read."""
    return (placeholder if scale is None else scale).numpy(), scale is not None


# -- FTRL-Proximal on a linear score: state rows are features ----------------------------------

def ftrl_weights(z: Tensor, root: Tensor, alpha: float, beta: float, decay: float,
                 shrink: float = 0.0) -> Tensor:
    """w = −z' / ((β + √n) / α + decay) from a state's z and √n (decay = λ·rows, see
    largeml.ftrl), z' = z soft-thresholded by `shrink` (λ1·rows): exactly 0 where |z| ≤ λ1·t,
    and for a feature never seen (z = 0), also where β = decay = 0."""
    if shrink:
        z = z - z.clamp(-shrink, shrink)
    # In place where a result is new: over 2 M features (strided columns of the state) 11 ms
    # against 34 for the same ops each into a new tensor, the same numbers.
    w = torch.div(z, (root + beta).div_(alpha).add_(decay)).neg_()
    return w.masked_fill_(z == 0, 0.0)


def ftrl_weights_into(state: Tensor, alpha: float, beta: float, decay: float, shrink: float,
                      out: Tensor) -> None:
    """out = `ftrl_weights` of `state`'s z and √n, written into `out` (a 1-d view): on the CPU
    in one compiled pass (3 ms over 2 M features here, against 25 ms for the torch ops)."""
    if available(state) and out.is_contiguous():
        _ftrl_weights(state.numpy(), alpha, beta, decay, shrink, out.detach().numpy())
    else:
        out.copy_(ftrl_weights(state[:, Z], state[:, ROOT], alpha, beta, decay, shrink))


def binned(values: Tensor, lo: float, hi: float, bins: int) -> tuple[list[float], float, float]:
    """(the count of each of `bins` equal bins from lo to hi, Σv, Σv²) over the values of a
    1-d CPU tensor, all in [lo, hi] (finite), lo < hi. Compiled: one pass (2 ms
    over 2 M weights, against 15 ms for torch's histc and float64 sums)."""
    counts = np.zeros(bins, np.int64)
    total, squares = _binned(values.numpy(), lo, hi, counts)
    return counts.astype(np.float64).tolist(), total, squares


def ftrl_step(z, root, g, w, alpha: float):
    """FTRL's update from gradient g at weight w: (z + g − σ·w, √(n + g²)) with
    σ = (√(n + g²) − √n) / α. Tensors (the torch forms) or floats (the bias)."""
    root_new = (root * root + g * g) ** 0.5
    return z + g - (root_new - root) / alpha * w, root_new


def _addressed(shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple:
    """(addresses, lengths): each shard's (indptr, indices, values) arrays by address and
    length, as `_ftrl_pieces` reads them. The arrays must outlive the loop's use of them."""
    for arrays in shards:
        assert [a.dtype for a in arrays] == [np.int64, np.int32, np.float32], arrays
        assert all(a.flags.c_contiguous for a in arrays)
    return (np.array([[a.ctypes.data for a in arrays] for arrays in shards], np.intp),
            np.array([[len(a) for a in arrays] for arrays in shards], np.intp))


def _compiled_maps(maps) -> tuple:
    """`_addressed` for a stream's `ShardMaps`, found once per stream."""
    if maps.compiled is None:
        maps.compiled = _addressed(list(zip(maps.indptr, maps.indices, maps.values,
                                            strict=True)))
    return maps.compiled


def ftrl_rows(x: Tensor, y: Tensor, state: Tensor, scale: Tensor | None, bias: Tensor,
              alpha: float, beta: float, l2: float, rows_before: int, loss: int,
              l1: float = 0.0, lanes: int = 1) -> Tensor:
    """FTRL over the rows of CSR batch `x` one at a time (each row's score, its loss `loss`, its
    update), as the paper and Vowpal Wabbit do; returns the rows' losses. `scale`: the
    features' scales (None: all 1). `lanes` > 1: on that many cores at once, Hogwild
    (`_ftrl_lanes`: faster where features are many and rarely shared, not the same numbers
    from run to run). Compiled only."""
    crow, cols, vals = _parts(x)
    arrays = (crow.astype(np.int64), cols, vals)  # one piece: all rows of one "shard"
    return _ftrl(np.array([[0, 0, len(y)]], np.int64), _addressed([arrays]), y, state, scale,
                 bias, alpha, beta, l2, l1, rows_before, loss, lanes)


def ftrl_pieces(x, y: Tensor, state: Tensor, scale: Tensor | None, bias: Tensor,
                alpha: float, beta: float, l2: float, rows_before: int, loss: int,
                l1: float = 0.0, lanes: int = 1) -> Tensor:
    """`ftrl_rows` over the rows of `x`, a `largeml.data.stream.RowPieces`, read where they lie
    in the shards' memory maps: the same loop, the same numbers, nothing copied. Compiled
    only."""
    return _ftrl(x.pieces, _compiled_maps(x.maps), y, state, scale, bias, alpha, beta, l2, l1,
                 rows_before, loss, lanes)


def _ftrl(pieces, maps: tuple, y: Tensor, state: Tensor, scale: Tensor | None, bias: Tensor,
          alpha: float, beta: float, l2: float, l1: float, rows_before: int, loss: int,
          lanes: int) -> Tensor:
    out = torch.empty(len(y))
    if lanes > 1:  # Hogwild, on no more lanes than numba's threads or the batch's rows
        lanes = max(1, min(lanes, numba.get_num_threads(), len(y)))
    arguments = (pieces, *maps, y.numpy(), state.numpy(), *_scale(scale, y), bias.numpy(),
                 alpha, beta, l2, l1, rows_before, loss, out.numpy())
    if lanes == 1:
        _ftrl_pieces(*arguments)
    else:
        _ftrl_lanes(*arguments, lanes)
    return out


def ftrl_scores(x: Tensor, state: Tensor, scale: Tensor, alpha: float, beta: float,
                decay: float, bias: float, shrink: float = 0.0) -> Tensor:
    """The scores of CSR batch `x` at the weights `state` stands for (torch ops, any device)."""
    cols = x.col_indices()
    s = state[cols]
    per = ftrl_weights(s[:, Z], s[:, ROOT], alpha, beta, decay, shrink) * scale[cols] \
        * x.values()
    return torch.segment_reduce(per, "sum", offsets=x.crow_indices()) + bias


def ftrl_update(x: Tensor, d: Tensor, state: Tensor, scale: Tensor, alpha: float, beta: float,
                decay: float, shrink: float = 0.0) -> None:
    """One FTRL step on `state` for the whole CSR batch `x` (torch ops, any device): g_j is the
    gradient of the batch's summed loss, from ∂loss/∂score `d` of each row."""
    cols = x.col_indices().long()
    rows = torch.repeat_interleave(d, x.crow_indices().diff())
    grad = torch.zeros(state.shape[0], dtype=state.dtype, device=state.device)
    grad.index_add_(0, cols, rows * scale[cols] * x.values())
    # Each feature's new z and n computed once per non-zero from the old ones: a feature met
    # twice gets the same values written twice.
    z, root = state[cols, Z], state[cols, ROOT]
    state[cols, Z], state[cols, ROOT] = ftrl_step(
        z, root, grad[cols], ftrl_weights(z, root, alpha, beta, decay, shrink), alpha)


# -- a plain linear score and its gradient, for evaluation and the objective -------------------

def linear_rows(x: Tensor, y: Tensor, wg: Tensor, scale: Tensor | None, bias: float,
                loss: int) -> tuple[float, float]:
    """Σ_i loss(x_i·(scale ⊙ w) + bias, y_i) over CSR batch `x`, adding Σ_i ∂loss_i/∂w into
    the gradient; returns (the loss sum, Σ_i ∂loss_i/∂bias). `wg` is (n_features, 2): w in
    column 0, read, beside the gradient in column 1, added to. One pass over the non-zeros.
    Compiled only (see `available`)."""
    return _linear_rows(*_parts(x), y.numpy(), wg.numpy(), *_scale(scale, y), bias, loss)


def linear_pieces(x, y: Tensor, wg: Tensor, scale: Tensor | None, bias: float, loss: int,
                  sums: np.ndarray) -> None:
    """`linear_rows` over the rows of `x`, a `largeml.data.stream.RowPieces`, read where they
    lie, in `len(wg)` lanes side by side: `wg` is (lanes, n_features, 2), each lane's w
    beside its gradient, added to; each lane adds its loss sum and its Σ ∂loss/∂bias into
    `sums[lane]`. The same sums as one lane, but for the order of the additions. Compiled
    only."""
    _linear_pieces(x.pieces, *_compiled_maps(x.maps), y.numpy(), wg.numpy(), *_scale(scale, y),
                   bias, loss, sums, NO_ROWS)


def max_abs_lanes(n_features: int) -> Tensor:
    """The zeros `max_abs` starts from: (lanes, n_features), a row for each of numba's
    threads."""
    return torch.zeros(numba.get_num_threads(), n_features)


def max_abs(x, own: Tensor) -> None:
    """own[l, j] = max(own[l, j], max_i |x_ij|) over lane l's share of the rows of `x`, a
    `largeml.data.stream.RowPieces` read where they lie (own from `max_abs_lanes`): the
    maxima over all the rows passed are `own.amax(0)`. Compiled only."""
    _max_abs_pieces(x.pieces, *_compiled_maps(x.maps), own.numpy())


def linear_scores(x, w: Tensor, scale: Tensor | None, bias: float) -> Tensor:
    """`csr_matvec` for `x`, a `largeml.data.stream.RowPieces`: the rows read where they lie,
    split among numba's threads (each row's score is its own: the same numbers on any number).
    Compiled only."""
    out = torch.empty(len(x))
    _linear_scores(x.pieces, *_compiled_maps(x.maps), w.numpy(), *_scale(scale, w), bias,
                   out.numpy(), numba.get_num_threads())
    return out


def newton_point(x, y: Tensor, own: Tensor, scale: Tensor | None, bias: float, loss: int,
                 sums: np.ndarray, curvature: np.ndarray | None = None) -> None:
    """`linear_pieces` that also sums the Hessian's diagonal, for a Newton solver: `own` is
    (lanes, n_features, 4), each lane's w (column 0, read) beside its gradient and its
    Σ loss″·x² (columns 1, 2, added to); `sums[lane]` gets the lane's loss sum, Σ ∂loss/∂bias
    and Σ loss″; `curvature` (float32, one a row of `x`), if given, each row's loss″. Loss BCE
    or SQUARED_HINGE. Compiled only."""
    _linear_pieces(x.pieces, *_compiled_maps(x.maps), y.numpy(), own.numpy(), *_scale(scale, y),
                   bias, loss, sums, NO_ROWS if curvature is None else curvature)


def newton_hvp(x, y: Tensor, own: Tensor, scale: Tensor | None, bias: float, bias_v: float,
               loss: int, sums: np.ndarray, curvature: np.ndarray | None = None) -> None:
    """The Hessian of the summed loss times v (no L2 term), over the rows of `x` (RowPieces)
    in lanes: `own` is (lanes, n_features, 2 or more), each lane's v (column 0, read) beside
    its part of H·v (column 1, added to); `sums[lane, 0]` gets its part of the bias's. Each
    row's loss″ is `curvature` (as `newton_point` kept it at the same point), or with None is
    computed from its score with w, column 2 of `own` (read). Compiled only."""
    _newton_hvp(x.pieces, *_compiled_maps(x.maps), y.numpy(), own.numpy(), *_scale(scale, y),
                bias, bias_v, loss, NO_ROWS if curvature is None else curvature, sums)


def newton_hessian(x, y: Tensor, w: Tensor, scale: Tensor | None, bias: float, loss: int,
                   h: np.ndarray) -> None:
    """Adds Σ_i loss″_i·z_i·z_iᵀ (z_i = [x_i, 1]) over the rows of `x` (RowPieces) into `h`,
    (n_features + 1)² float64: the whole Hessian of the summed loss, for narrow data. Compiled
    only."""
    _newton_hessian(x.pieces, *_compiled_maps(x.maps), y.numpy(), w.numpy(), *_scale(scale, y),
                    bias, loss, h)


def csr_matvec(x: Tensor, w: Tensor, scale: Tensor | None, bias: float) -> Tensor:
    """Σ_j w_j · scale_j · x_ij + bias for each row of CSR batch `x` (scale None: all 1)."""
    if available(x):
        out = torch.empty(x.shape[0])
        _csr_matvec(*_parts(x), w.numpy(), *_scale(scale, w), bias, out.numpy())
        return out
    per = w[x.col_indices()] * x.values()
    if scale is not None:
        per = per * scale[x.col_indices()]
    return torch.segment_reduce(per, "sum", offsets=x.crow_indices()) + bias


def csr_rmatvec(x: Tensor, d: Tensor, scale: Tensor | None, out: Tensor) -> None:
    """out_j += Σ_i d_i · scale_j · x_ij: the weight gradient of a batch, accumulated (scale
    None: all 1)."""
    if available(x):
        _csr_rmatvec(*_parts(x), d.numpy(), *_scale(scale, out), out.numpy())
        return
    cols = x.col_indices().long()
    per = torch.repeat_interleave(d, x.crow_indices().diff()) * x.values()
    out.index_add_(0, cols, per if scale is None else per * scale[cols])
